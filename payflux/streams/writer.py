"""
The append path: idempotent, ordered appends of payment events to Redis Streams.

One Lua call per partition checks every event's dedupe record and, only if no
event conflicts, appends the new ones and records them (docs/stream-format.md
is the contract).  With one partition a whole ``append`` is atomic: all new
events are written, or none.

Group commit: ``append`` calls made in the same reactor turn are sent as one
EVALSHA per partition (a *flush*).  Each call is a *segment* of the flush and
the script treats segments like sequential calls, so every caller still gets
its own results, conflicts and "full" refusals.  What a flush shares is its
fate on the Redis side: OOM, a lost connection or any other error reply fails
every call in it with the same error (docs/stream-format.md, "Atomicity and
failures").

Partial writes inside a script: the script performs every check (dedupe
records, in-call duplicates, stream length cap) of every segment before its
first write, and its first write is the first XADD.  Scripts here carry no
``#!lua`` flags, so Redis 6.2 and 7.x both apply the legacy rule: when
``used_memory`` exceeded ``maxmemory`` as the script started (with
``noeviction``), the *first* write command fails with ``OOM`` (the script
aborts with nothing written); once a script has written, later writes in it
are never rejected for memory.  Other mid-script failures (WRONGTYPE on the
stream key) also hit the first XADD.  So a flush writes all of its accepted
segments or nothing at all; ``test_writer`` checks this against real
servers filled to ``maxmemory``.

Compact dedupe records (layout "payflux", ``appendscript`` docstring): every key the script
touches is declared in KEYS, so the writer keeps a ``DedupeView`` of each partition's dedupe
table and declares the buckets of the generations it lists.  When that view is out of date (a
new generation, on a time-slice boundary or when one fills up, or another node created one)
the script writes nothing and answers ``stale`` with the table; the writer refreshes the view
and sends the same segments again (at most ``MAX_STALE_RETRIES`` times, then the flush fails
as RedisUnavailable).  A NOSCRIPT reload or a replica WAIT apply to each attempt.

The script and its KEYS/ARGV layout live in ``appendscript``; the EVALSHA is
RESP-encoded by ``resp`` rather than by txredisapi (``encode=False`` turns
that off) and still goes through txredisapi's ``execute_command``.  Their
names stay importable from here.

Replica acknowledgement (``min_replicas_ack`` > 0, off by default): right
behind a flush's EVALSHA, on the same connection and without waiting for its
reply, the writer sends ``WAIT <min_replicas_ack> <replica_ack_timeout_ms>``.
A segment that got ``ok`` is delivered only if WAIT counted at least that
many replicas; otherwise it fails with :class:`ReplicasNotAcked` (HTTP 503):
its events *are* written on the primary, only not known to be on a replica,
and a retry with the same event_ids is a duplicate (nothing appended twice).
Conflicts and "full" refusals wrote nothing and keep their own errors.  WAIT
makes an acknowledged event survive the failover to a replica that had it;
it is not strong consistency (docs/sentinel.md).  Off, nothing extra is sent.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from typing import Any

import attrs
import txredisapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.redis.replies import RedisUnavailable, outage_reason
from payflux.redis.resp import Encoded, encode_command
from payflux.redis.scripts import evalsha
from payflux.redis.txadapter import accepts_encoded, peek_connection
from payflux.streams.appendscript import (
    APPEND_SCRIPT,
    APPEND_SCRIPT_SHA,
    FORMAT_VERSION,
    DedupeView,
    append_args,
    is_stale,
    script_for,
    segment_replies,
    written_records,
)
from payflux.streams.keys import StreamKeys, partition_for

__all__ = [
    "APPEND_SCRIPT",
    "APPEND_SCRIPT_SHA",
    "DEFAULT_MAX_FLUSH_EVENTS",
    "FORMAT_VERSION",
    "AppendResult",
    "IdempotencyConflict",
    "PreparedEvent",
    "RedisUnavailable",
    "ReplicasNotAcked",
    "StreamWriter",
    "encode_command",
    "fingerprint_of",
]

log = Logger()

DEFAULT_MAX_FLUSH_EVENTS = 1000
#: Calls of one flush answered ``stale`` (the dedupe table changed under the writer's view)
#: before it gives up with RedisUnavailable; each one wrote nothing.
MAX_STALE_RETRIES = 5


@attrs.frozen
class PreparedEvent:
    """A validated event, ready to append (built by the HTTP layer)."""

    event_id: str
    merchant_id_hash: str
    event_type: str
    canonical: bytes  # canonical JSON of the event
    fingerprint: str  # hex sha256 of canonical


@attrs.frozen
class AppendResult:
    """Where an event lives; ``duplicate`` if it was appended by an earlier call."""

    stream_id: str
    duplicate: bool


class IdempotencyConflict(Exception):
    """Some event_ids were already used with a different payload (HTTP 409)."""

    def __init__(self, event_ids: list[str]) -> None:
        self.event_ids = list(event_ids)
        super().__init__(f"event_id already used with a different payload: {', '.join(self.event_ids)}")


class ReplicasNotAcked(RedisUnavailable):
    """
    Written on the primary, but WAIT counted fewer replicas than ``min_replicas_ack`` (HTTP 503).
    ``client_message`` is what the HTTP caller is told.
    """

    code = "replicas_not_acked"

    def __init__(self, acked: int, required: int, timeout_ms: int) -> None:
        self.acked = acked
        self.required = required
        super().__init__(
            f"written on the redis primary but acknowledged by {acked} of {required} required replicas "
            f"within {timeout_ms} ms"
        )
        self.client_message = (
            f"the events were written on the primary but only {acked} of the {required} required replicas "
            f"acknowledged them within {timeout_ms} ms, so a failover could still lose them; retry with the same "
            f"event_id (a duplicate-safe no-op that waits for the replicas again)"
        )


class _Abandoned:
    """Set once the caller has given up, so late connections don't send stale appends."""

    abandoned = False
    timed_out = False  # given up because ``timeout`` passed (not cancelled by the caller)

    def abandon(self, _: Any) -> None:
        self.abandoned = True


@attrs.define(eq=False)
class _Segment:
    """The events of one ``append`` call that go to one partition."""

    events: list[PreparedEvent]
    received_at_ms: int
    state: _Abandoned
    done: defer.Deferred = attrs.Factory(defer.Deferred)  # list[AppendResult] or a failure

    def fire(self, result: Any) -> None:
        if not self.done.called:
            if isinstance(result, Failure):
                self.done.errback(result)
            else:
                self.done.callback(result)


class StreamWriter:
    """
    Appends prepared events; see ``append`` for the contract.

    ``redis`` is a txredisapi handler (``payflux.redis.connect.connect``),
    an object delegating attribute access to one (a pooled connection is taken
    first, :func:`payflux.redis.txadapter.peek_connection`, so nothing is sent
    after a caller gave up), or
    a single connected txredisapi protocol.  ``timeout`` bounds every
    ``append`` as a whole: waiting for its flush, for a pooled connection,
    EVALSHA and a NOSCRIPT reload.  ``max_stream_length`` (None = no cap) makes an append
    that would grow a stream past it fail with RedisUnavailable, writing
    nothing: a guard for when trimming falls behind; the append path never trims.

    ``group_commit`` (default on) coalesces the appends of one reactor turn
    into one EVALSHA per partition, flushed by ``reactor.callLater(0)`` or at
    once when ``max_flush_events`` events are waiting.  ``encode`` (default
    on) encodes the EVALSHA here instead of in txredisapi; both switches exist
    so tests and bench/writer_micro.py can compare.  ``min_replicas_ack`` > 0
    pipelines ``WAIT min_replicas_ack replica_ack_timeout_ms`` behind every
    EVALSHA (module docstring); keep ``replica_ack_timeout_ms`` well below
    ``timeout`` and the connection's reply timeout.
    """

    def __init__(
        self,
        redis: Any,
        keys: StreamKeys,
        partitions: int,
        dedupe_window_seconds: int,
        timeout: float,
        reactor: Any,
        max_stream_length: int | None = None,
        group_commit: bool = True,
        max_flush_events: int = DEFAULT_MAX_FLUSH_EVENTS,
        encode: bool = True,
        min_replicas_ack: int = 0,
        replica_ack_timeout_ms: int = 500,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        if dedupe_window_seconds < 1:
            raise ValueError("dedupe_window_seconds must be >= 1")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if max_stream_length is not None and max_stream_length < 1:
            raise ValueError("max_stream_length must be >= 1 or None")
        if max_flush_events < 1:
            raise ValueError("max_flush_events must be >= 1")
        if min_replicas_ack < 0:
            raise ValueError("min_replicas_ack must be >= 0")
        if min_replicas_ack and replica_ack_timeout_ms < 1:
            raise ValueError("replica_ack_timeout_ms must be >= 1 (WAIT with 0 would block forever)")
        self.redis = redis
        self.keys = keys
        self.partitions = partitions
        self.dedupe_window_ms = int(dedupe_window_seconds * 1000)
        self.timeout = timeout
        self.reactor = reactor
        self.max_stream_length = max_stream_length
        self.group_commit = group_commit
        self.max_flush_events = max_flush_events
        self.encode = encode
        self.min_replicas_ack = min_replicas_ack
        self.replica_ack_timeout_ms = replica_ack_timeout_ms
        self.script = script_for(keys)
        self._views: dict[int, DedupeView] = {}
        self._pending: dict[int, list[_Segment]] = {}
        self._pending_events = 0
        self._flush_call: Any = None
        self._deadlines: deque[tuple[float, defer.Deferred, _Abandoned]] = deque()
        self._deadline_call: Any = None

    def append(self, events: list[PreparedEvent], received_at_ms: int) -> defer.Deferred:
        """
        Append ``events``; fires with one AppendResult per event, in input order.

        Events are grouped by ``partition_for(merchant_id_hash)``, one EVALSHA
        per partition (shared with the other appends of this reactor turn
        under group commit); within a partition the call is atomic.  A duplicate
        (same event_id and fingerprint within the window, earlier in this
        call, or in an earlier call of the same flush) gets the original
        stream id and ``duplicate=True`` and appends nothing.  Errbacks with
        IdempotencyConflict (listing every conflicting event_id of this call;
        nothing of this call written in that partition) or RedisUnavailable
        (timeout after ``timeout`` seconds, lost connection, OOM/READONLY/...;
        these hit every call of a flush).  With several partitions,
        partitions without a conflict or error are still written.
        """
        if not events:
            return defer.succeed([])
        groups: dict[int, list[int]] = {}
        for index, event in enumerate(events):
            groups.setdefault(partition_for(event.merchant_id_hash, self.partitions), []).append(index)

        state = _Abandoned()
        outer: defer.Deferred = defer.Deferred(state.abandon)

        def finish(result: Any) -> None:
            # txredisapi's pool Deferreds can't be cancelled safely, so the
            # timeout cancels only ``outer``; late results are dropped here.
            if outer.called:
                if isinstance(result, Failure):
                    log.debug("append finished after its caller gave up: {f}", f=result.getErrorMessage())
                return None
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)
            return None

        if len(groups) == 1:
            # one partition (every single event): its segment's results are already in input
            # order and its conflict already lists each event_id once, so no DeferredList
            [(partition, _)] = groups.items()
            segments = {partition: _Segment(events, received_at_ms, state)}
            segments[partition].done.addErrback(self._map_error).addBoth(finish)
        else:
            segments = {p: _Segment([events[i] for i in idxs], received_at_ms, state) for p, idxs in groups.items()}
            work = defer.DeferredList(
                [s.done.addErrback(self._map_error) for s in segments.values()], consumeErrors=True
            )
            work.addCallback(self._combine, groups, len(events))
            work.addBoth(finish)

        outer.addBoth(self._forget_settled)  # first: however it settles (answer, timeout, caller's cancel)
        outer.addErrback(self._timed_out, state)
        outer.addErrback(self._log_unavailable, len(events))
        self._watch(outer, state)
        for partition, segment in segments.items():
            self._enqueue(partition, segment)
        return outer

    # --- the timeout: one timer for all appends, not a DelayedCall scheduled and cancelled per
    # append (their deadlines come in order while ``timeout`` stays the same) ---

    def _watch(self, outer: defer.Deferred, state: "_Abandoned") -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].called:  # settled: forget (answers come mostly in order)
            deadlines.popleft()
        deadline = self.reactor.seconds() + self.timeout
        deadlines.append((deadline, outer, state))
        self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        """The timer fires no later than ``deadline``."""
        call = self._deadline_call
        if call is None:
            self._deadline_call = self.reactor.callLater(max(deadline - self.reactor.seconds(), 0.0), self._expire)
        elif call.getTime() > deadline:
            call.reset(max(deadline - self.reactor.seconds(), 0.0))

    def _forget_settled(self, result: Any = None) -> Any:
        """Drop settled appends off the head; no timer while none waits.  Passes ``result`` on."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].called:
            deadlines.popleft()
        if not deadlines and self._deadline_call is not None:
            if self._deadline_call.active():
                self._deadline_call.cancel()
            self._deadline_call = None
        return result

    def _expire(self) -> None:
        self._deadline_call = None
        now = self.reactor.seconds()
        due = [(outer, state) for deadline, outer, state in self._deadlines if deadline <= now and not outer.called]
        # the rest, in order (a caller's callbacks below may append: _watch arms the timer for those)
        self._deadlines = deque(entry for entry in self._deadlines if entry[0] > now and not entry[1].called)
        if self._deadlines:
            self._arm(min(entry[0] for entry in self._deadlines))
        for outer, state in due:
            if not outer.called:
                state.timed_out = True
                outer.cancel()  # abandons the append; _timed_out makes it RedisUnavailable

    def _timed_out(self, failure: Failure, state: "_Abandoned") -> Failure:
        if state.timed_out and failure.check(defer.CancelledError):
            raise RedisUnavailable(f"no reply from redis within {self.timeout:g}s")
        return failure

    def _log_unavailable(self, failure: Failure, count: int) -> Failure:
        if failure.check(RedisUnavailable):
            log.warn("redis unavailable, {count} events not appended: {reason}", count=count, reason=str(failure.value))
        return failure

    def _combine(self, outcomes: list[tuple[bool, Any]], groups: dict[int, list[int]], total: int) -> list[AppendResult]:
        results: list[AppendResult | None] = [None] * total
        conflicts: list[str] = []
        first_error: Failure | None = None
        for (ok, value), idxs in zip(outcomes, groups.values()):
            if ok:
                for i, r in zip(idxs, value):
                    results[i] = r
            elif value.check(IdempotencyConflict):
                conflicts.extend(value.value.event_ids)
            elif first_error is None:
                first_error = value
        if first_error is not None:
            first_error.raiseException()
        if conflicts:
            raise IdempotencyConflict(list(dict.fromkeys(conflicts)))
        return [r for r in results if r is not None]

    def _enqueue(self, partition: int, segment: _Segment) -> None:
        if not self.group_commit:
            self._write(partition, [segment])
            return
        self._pending.setdefault(partition, []).append(segment)
        self._pending_events += len(segment.events)
        if self._pending_events >= self.max_flush_events:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Send every waiting append now (one EVALSHA per partition); normally called by the reactor."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        pending, self._pending, self._pending_events = self._pending, {}, 0
        for partition, segments in pending.items():
            self._write(partition, segments)

    def _write(self, partition: int, segments: list[_Segment]) -> None:
        d = self._connection()
        d.addCallback(self._evalsha, partition, segments)
        d.addErrback(self._fail, segments)

    @staticmethod
    def _fail(failure: Failure, segments: list[_Segment]) -> None:
        for s in segments:
            s.fire(failure)

    def _connection(self) -> defer.Deferred:
        # A pool handler would pick a connection and send in one step; we need
        # the connection first so nothing is sent after the caller gave up.
        return peek_connection(self.redis)

    @staticmethod
    def _live(segments: list[_Segment]) -> list[_Segment]:
        """The segments whose callers still wait; the others are settled (their caller has its timeout)."""
        live = []
        for s in segments:
            if s.state.abandoned:
                s.fire([])
            else:
                live.append(s)
        return live

    def _evalsha(self, conn: Any, partition: int, segments: list[_Segment]) -> defer.Deferred | None:
        """The append script for the segments still waiting, on ``conn`` (reloaded on NOSCRIPT)."""
        if not self._live(segments):
            return None

        def send(attempt: int = 0) -> defer.Deferred:
            # sent again after a NOSCRIPT reload or a stale reply: only for the callers still waiting by then
            live = self._live(segments)
            if not live:
                return defer.succeed(None)
            d, proposal = self._send(conn, partition, live)
            if self.min_replicas_ack:
                d = self._with_replica_acks(conn, d)
            else:
                d.addCallback(lambda reply: (reply, None))

            def replied(reply_acks: tuple[Any, int | None]) -> Any:
                reply, acked = reply_acks
                if is_stale(reply):
                    self._view(partition).refresh(reply, self._now_ms())
                    if attempt + 1 >= MAX_STALE_RETRIES:
                        raise RedisUnavailable(f"the dedupe table of partition {partition} kept changing "
                                               f"({MAX_STALE_RETRIES} stale replies in a row)")
                    return send(attempt + 1)
                return self._deliver(reply, partition, live, acked, proposal)

            return d.addCallback(replied)

        return evalsha(conn, self.script, send=send)

    def _with_replica_acks(self, conn: Any, evalsha: defer.Deferred) -> defer.Deferred:
        """``evalsha``'s reply and WAIT's replica count, WAIT sent at once behind it on ``conn``."""
        wait = conn.execute_command("WAIT", self.min_replicas_ack, self.replica_ack_timeout_ms)

        def refused(failure: Failure) -> None:
            # e.g. "ERR WAIT cannot be used with replica instances": a demoted primary ran a
            # write-free (all-duplicate) script; treat it like READONLY
            failure.trap(txredisapi.ResponseError)
            raise RedisUnavailable(f"redis refused WAIT: {failure.getErrorMessage()}")

        def replied(reply: Any) -> defer.Deferred:
            return wait.addCallbacks(lambda acked: (reply, int(acked)), refused)

        def failed(failure: Failure) -> Failure:
            wait.addErrback(lambda _: None)  # the EVALSHA's error is the one that counts
            return failure

        return evalsha.addCallbacks(replied, failed)

    def _view(self, partition: int) -> DedupeView:
        view = self._views.get(partition)
        if view is None:
            view = self._views[partition] = DedupeView()
        return view

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    def _send(self, conn: Any, partition: int, segments: list[_Segment]) -> tuple[defer.Deferred, Any]:
        """The EVALSHA of ``segments`` sent on ``conn``, and the dedupe generation it proposes (or None)."""
        args, proposal = append_args(self.keys, partition, segments, self.dedupe_window_ms, self.max_stream_length,
                                     self._view(partition), self._now_ms())
        if self.encode and getattr(conn, "routes_encoded", False):  # a cluster client: route by the stream key
            return conn.execute_command(Encoded(encode_command(args)), route_key=args[3]), proposal
        if self.encode and accepts_encoded(conn):
            return conn.execute_command(Encoded(encode_command(args))), proposal
        return conn.execute_command(*args), proposal

    def _deliver(self, reply: Any, partition: int, segments: list[_Segment], acked: int | None = None,
                 proposal: Any = None) -> None:
        replies = segment_replies(reply, len(segments))
        if self.keys.layout != "seed":
            self._view(partition).accepted(proposal, written_records(replies))
        stream = self.keys.events(partition)
        for segment, segment_reply in zip(segments, replies):
            try:
                results = self._parse_reply(segment_reply, segment.events, stream)
                if acked is not None and acked < self.min_replicas_ack:
                    raise ReplicasNotAcked(acked, self.min_replicas_ack, self.replica_ack_timeout_ms)
            except Exception:
                segment.fire(Failure())
            else:
                segment.fire(results)

    def _parse_reply(self, reply: Any, events: list[PreparedEvent], stream: str) -> list[AppendResult]:
        kind = str(reply[0])
        if kind == "conflict":
            ids = [events[int(i) - 1].event_id for i in reply[1:]]
            raise IdempotencyConflict(list(dict.fromkeys(ids)))
        if kind == "full":
            raise RedisUnavailable(
                f"stream {stream} is full ({reply[1]} entries, max_stream_length {self.max_stream_length})"
            )
        if kind != "ok" or len(reply) != 1 + 2 * len(events):
            raise RuntimeError(f"unexpected reply from append script: {reply!r:.200}")
        return [AppendResult(str(reply[1 + 2 * i]), int(reply[2 + 2 * i]) == 1) for i in range(len(events))]

    @staticmethod
    def _map_error(failure: Failure) -> Failure:
        if failure.check(RedisUnavailable):
            return failure
        reason = outage_reason(failure, "the append")
        if reason is not None:
            raise RedisUnavailable(reason)
        return failure


def fingerprint_of(canonical: bytes) -> str:
    """The fingerprint PreparedEvent expects: hex sha256 of the canonical JSON."""
    return hashlib.sha256(canonical).hexdigest()
