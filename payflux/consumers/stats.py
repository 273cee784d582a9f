"""
Sampled consumer-group gauges: lag, pending, oldest pending age and DLQ depth.

``GroupStatsSampler`` reads every partition once per ``interval`` seconds (on the injected
reactor, a Clock in tests) with the same step functions as ``payflux stream info``
(:mod:`payflux.consumers.inspect`) and sets, per ``(group, partition)``:

- ``payflux_group_lag``: from Redis 7.x ``XINFO GROUPS`` or computed (6.2, or 7.x nil); when it
  can't be known the label set is **removed** (absent), never 0;
- ``payflux_group_pending``: the group's pending count (0 is a real value);
- ``payflux_group_oldest_pending_age_seconds``: absent when nothing is pending;
- ``payflux_group_idle_seconds``: seconds since any consumer of the group last read or claimed
  (absent for a group without consumers); a group nobody runs any more keeps growing it, which
  the ``PayfluxConsumerGroupStale`` rule (against ``payflux_group_idle_warning_seconds``, the
  node's ``group_idle_warning``) and ``payflux group list`` flag;
- ``payflux_dlq_depth{partition}``.

Groups that disappear are removed from every gauge.  When a partition can't be read (Redis
down, wrong key type) its gauges are removed too (unknown, not stale) and the failure is
logged; the loop goes on.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Union

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.consumers.inspect import PartitionFacts, partition_steps
from payflux.consumers.periodic import PeriodicService
from payflux.observability.metrics import ConsumerMetrics
from payflux.redis.steps import run_deferred
from payflux.streams.keys import StreamKeys
from payflux.streams.outage import log_step_failure

log = Logger()

# a Deferred, or a callable returning one (e.g. a pool's whenConnected), fired when Redis answers
ReadyArg = Union[defer.Deferred, Callable[[], defer.Deferred], None]


def _remove(gauge: Any, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass


class GroupStatsSampler(PeriodicService):
    """Fills the consumer-group gauges of ``metrics`` every ``interval`` seconds (see module doc)."""

    def __init__(self, redis: Any, keys: StreamKeys, partitions: int, metrics: ConsumerMetrics, reactor: Any,
                 interval: float = 5.0, ready: ReadyArg = None, max_scan: int = 10_000,
                 idle_warning: float = 86400.0) -> None:
        self.redis = redis
        self.keys = keys
        self.partitions = partitions
        self.metrics = metrics
        self.reactor = reactor
        self.interval = interval
        self.ready = ready
        self.max_scan = max_scan
        self._groups: dict[int, set[str]] = {}  # groups with gauges, per partition
        metrics.idle_warning.set(idle_warning)

    def run_pass(self) -> defer.Deferred:
        return self.sample_once()

    @defer.inlineCallbacks
    def sample_once(self) -> Generator:
        """Sample every partition; fires with ``{partition: PartitionFacts}`` of those read."""
        now = self.reactor.seconds()
        results = {}
        for p in range(self.partitions):
            try:
                facts = yield run_deferred(partition_steps(self.keys, p, now, self.max_scan),
                                           self.redis.execute_command)
            except Exception:
                log_step_failure(log, Failure(), "sampling consumer groups of {stream} failed",
                                 stream=self.keys.events(p))
                self._forget(p, set())
                _remove(self.metrics.dlq_depth, str(p))
                continue
            self.apply(facts)
            results[p] = facts
        return results

    def apply(self, facts: PartitionFacts) -> None:
        """Set (or remove) the gauges of one partition from its facts."""
        m, label = self.metrics, str(facts.partition)
        m.dlq_depth.labels(partition=label).set(facts.dlq_depth)
        for g in facts.groups:
            if g.lag is None:
                _remove(m.lag, g.name, label)
            else:
                m.lag.labels(group=g.name, partition=label).set(g.lag)
            m.pending.labels(group=g.name, partition=label).set(g.pending)
            if g.oldest_pending_age is None:
                _remove(m.oldest_pending_age, g.name, label)
            else:
                m.oldest_pending_age.labels(group=g.name, partition=label).set(g.oldest_pending_age)
            if g.idle is None:
                _remove(m.idle, g.name, label)
            else:
                m.idle.labels(group=g.name, partition=label).set(g.idle)
        self._forget(facts.partition, {g.name for g in facts.groups})

    def _forget(self, p: int, keep: set[str]) -> None:
        """Remove the gauges of partition ``p``'s groups that are not in ``keep``."""
        for name in self._groups.get(p, set()) - keep:
            for gauge in (self.metrics.lag, self.metrics.pending, self.metrics.oldest_pending_age, self.metrics.idle):
                _remove(gauge, name, str(p))
        self._groups[p] = set(keep)
