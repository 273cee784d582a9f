"""Background steps log a Redis outage as one warning line, anything else with its traceback."""

from __future__ import annotations

import txredisapi
from twisted.internet import defer, error
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from payflux.redis.replies import RedisUnavailable, is_outage
from payflux.streams.outage import log_step_failure


class OutageTests(SynchronousTestCase):
    def test_classification(self):
        for e in [txredisapi.ConnectionError("Lost connection"), txredisapi.TimeoutError("slow"),
                  defer.TimeoutError(), error.ConnectionRefusedError(), error.ConnectionLost(),
                  RedisUnavailable("down"), txredisapi.ResponseError("CLUSTERDOWN The cluster is down"),
                  txredisapi.ResponseError("LOADING Redis is loading the dataset in memory"),
                  txredisapi.ResponseError("TRYAGAIN Multiple keys request during rehashing of slot")]:
            self.assertTrue(is_outage(Failure(e)), e)
        for e in [ValueError("bug"), txredisapi.ResponseError("WRONGTYPE"), KeyError("x")]:
            self.assertFalse(is_outage(Failure(e)), e)

    def test_outage_is_a_warning_without_traceback_and_a_bug_is_a_failure(self):
        events = []
        log = Logger(namespace="payflux.test", observer=events.append)
        log_step_failure(log, Failure(txredisapi.ConnectionError("Lost connection")), "trim of {stream} failed",
                         stream="s")
        self.assertEqual(events[0]["log_level"], LogLevel.warn)
        self.assertNotIn("log_failure", events[0])
        self.assertEqual(events[0]["reason"], "Lost connection")
        try:
            raise ValueError("bug")
        except ValueError:
            log_step_failure(log, Failure(), "trim of {stream} failed", stream="s")
        self.assertEqual(events[1]["log_level"], LogLevel.critical)
        self.assertIsInstance(events[1]["log_failure"].value, ValueError)
