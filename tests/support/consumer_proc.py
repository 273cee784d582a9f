"""
A consumer process for fault tests: ConsumerService + ReclaimService on one group.

    python tests/support/consumer_proc.py REDIS_URL CONSUMER_NAME RECORD_KEY [DELAY_S [HANDLER_JSON]]

The handler waits DELAY_S per batch, then RPUSHes every handled event_id to RECORD_KEY (a
Redis list apart from the stream), so the test can compare handled ids end to end.  Prints
"ready" once started; SIGTERM stops it gracefully, SIGKILL is the crash under test.

With HANDLER_JSON (``{"handler": "file", "options": {...}}``) the handler is instead
``load_handler(handler, options)`` (an exporter), held DELAY_S after each batch it completed,
before the ack (the crash window that makes duplicates); RECORD_KEY is then unused.
"""

from __future__ import annotations

import json
import os
import sys

# Run as a script, this directory is sys.path[0], and its redis.py would shadow redis-py.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

from twisted.application.service import MultiService  # noqa: E402
from twisted.internet import reactor, task  # noqa: E402

from payflux.consumers.config import ConsumerConfig  # noqa: E402
from payflux.consumers.handlers import load_handler  # noqa: E402
from payflux.consumers.reclaim import ReclaimService  # noqa: E402
from payflux.consumers.service import ConsumerService, open_read_connection  # noqa: E402
from payflux.observability.metrics import Metrics  # noqa: E402
from payflux.redis.connect import connect  # noqa: E402
from payflux.redis.target import parse_redis_url  # noqa: E402
from payflux.streams.keys import StreamKeys  # noqa: E402


class RecordingHandler:
    def __init__(self, redis, key: str, delay: float) -> None:
        self.redis, self.key, self.delay = redis, key, delay

    async def handle(self, entries) -> None:
        await task.deferLater(reactor, self.delay, lambda: None)
        await self.redis.execute_command("RPUSH", self.key, *[e.event_id for e in entries])


class HeldHandler:
    """A real handler (an exporter), then a pause of ``delay`` before the runtime acks."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    async def handle(self, entries) -> None:
        result = self.inner.handle(entries)
        if result is not None:
            await result  # a Deferred or a coroutine
        await task.deferLater(reactor, self.delay, lambda: None)

    def close(self):
        return self.inner.close() if hasattr(self.inner, "close") else None


def main() -> None:
    url, name, record_key = sys.argv[1:4]
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.02
    target = parse_redis_url(url)
    redis = connect(target, 2, 1.0, 5.0)
    config = ConsumerConfig(name="fault", group="g", handler="test", batch_size=20, block_ms=200, concurrency=2,
                            max_deliveries=100, min_idle_ms=200, reclaim_interval=0.2, reclaim_count=50,
                            consumer_name=name)
    metrics = Metrics().consumers
    keys = StreamKeys("pf")
    handler = RecordingHandler(redis, record_key, delay)
    if len(sys.argv) > 5:
        spec = json.loads(sys.argv[5])
        handler = HeldHandler(load_handler(spec["handler"], spec.get("options", {}), reactor), delay)
    consumer = ConsumerService(config, handler, redis, lambda: open_read_connection(target, config.block_ms, 1.0), keys, 1, metrics, reactor)
    reclaim = ReclaimService(config, handler, redis, keys, 1, metrics, reactor, name, consumer.last_errors)
    services = MultiService()
    consumer.setServiceParent(services)
    reclaim.setServiceParent(services)
    services.startService()
    reactor.addSystemEventTrigger("before", "shutdown", services.stopService)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
