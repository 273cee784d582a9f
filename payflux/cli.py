"""
The ``payflux`` operator command.

- ``payflux check-config [node options]``: validate settings exactly as ``twistd payflux`` would
  (file < env < options) and print them with secrets redacted; exit 2 on the first bad option.
- ``payflux send``: post a sample event, N generated events, or a file of events (NDJSON, or a
  JSON array) to a running node and print each response; or, with ``--rate`` and ``--duration``,
  paced traffic (``--failure-rate``, ``--merchants``) for trying the risk consumer (docs/risk.md).
- ``payflux stream info``: per partition: length, first/last id, groups (consumers, pending, lag,
  oldest pending age) and DLQ depth.
- ``payflux dlq list|replay|purge``: inspect, re-append or delete dead letters.

The Redis commands take ``--redis-url``, ``--stream-prefix``, ``--partitions`` and ``--data-dir``,
defaulting from the daemon's settings (``--config`` TOML file, ``PAYFLUX_*`` env); with no Redis
URL configured they use the embedded Redis socket ``<data_dir>/redis.sock``.  People get
tables, scripts get ``--json``; every failure is one line on stderr and a non-zero exit
(1 = Redis failed or refused, 2 = bad usage or configuration).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import secrets
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, NoReturn, Sequence

from twisted.python import usage


def sample_event(n: int = 0, **overrides) -> dict:
    """A valid payment_exhaust event; ``overrides`` replace fields (None removes one)."""
    event = {
        "event_id": f"evt_{secrets.token_urlsafe(12)}",
        "event_type": "payment_failed",
        "occurred_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "processor": "stripe",
        "merchant_id_hash": f"m_{n % 50:04d}_5f2b9c1e",
        "payment_intent_id_hash": secrets.token_urlsafe(16),
        "amount_bucket": "10-50",
        "currency": "USD",
        "payment_method": "card",
        "geo_bucket": "US",
        "failure_category": "insufficient_funds",
        "failure_code": "card_declined",
        "retry_count": 0,
        "processor_latency_ms": 230,
    }
    for key, value in overrides.items():
        if value is None:
            event.pop(key, None)
        else:
            event[key] = value
    return event


def _check_config(argv: Sequence[str]) -> int:
    from payflux.config import OPTIONS
    from payflux.tap import Options

    options = Options()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        sys.stderr.write(f"payflux: {e}\n")
        return 2
    except SystemExit as e:  # postOptions already printed the one-line error
        return int(e.code or 2)
    settings = options.settings
    print("configuration OK")
    for option in OPTIONS:
        value = getattr(settings, option.name)
        if option.name == "api_keys":
            value = ", ".join(k.key_id for k in value) or "(none)"
            print(f"  {option.name:22} ids: {value}")
            continue
        if option.secret and value:
            value = "(set, redacted)"
        if isinstance(value, tuple):
            value = ",".join(value)
        print(f"  {option.name:22} {value}")
    if settings.insecure_dev_mode:
        print("WARNING: insecure_dev_mode is on: requests without an API key are accepted")
    return 0


def _post(url: str, body: bytes, content_type: str, api_key: str | None, timeout: float) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def _read_events(path: str) -> list:
    """A file (or '-' for stdin) of NDJSON or one JSON array; ValueError names the bad line."""
    data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    text = data.decode("utf-8").strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"not a JSON array ({e})") from None
    events = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                events.append(json.loads(line))
            except ValueError:
                raise ValueError(f"line {n} is not JSON") from None
    return events


# -- payflux send -------------------------------------------------------------------------------

#: What generated traffic is made of with --failure-rate: the event types the risk consumer counts
#: as outcomes by default (payflux/risk/config.py: failure_event_types, success_event_types) and
#: the failure categories (with a matching failure_code) failures are spread over evenly, as in
#: bench/risk.py, so failure_cluster sees four categories sharing a processor's failures.
FAILED, SUCCEEDED = "payment_failed", "payment_succeeded"
FAILURE_CATEGORIES = (("insufficient_funds", "card_declined"), ("do_not_honor", "do_not_honor"),
                      ("timeout", "processor_timeout"), ("fraud_suspected", "suspected_fraud"))
MAX_RATE = 1_000_000.0              # events per second
MAX_DURATION = 86_400.0             # seconds
MAX_BATCH = 10_000                  # events per request (the node's own cap: max_batch_events)
MAX_EVENTS = 100_000_000            # events per run
_SLUG = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _send_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="payflux send", description="Post payment_exhaust events to a node: a sample event, N generated "
        "events, a file of events, or paced traffic (--rate with --duration or --count).")
    parser.add_argument("--url", default=os.environ.get("PAYFLUX_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--api-key", default=os.environ.get("PAYFLUX_API_KEY"),
                        help="API key secret (default: $PAYFLUX_API_KEY; none in dev mode)")
    parser.add_argument("--file", help="NDJSON or JSON-array file of events ('-' = stdin)")
    parser.add_argument("--count", type=int, help="generated sample events to send (default 1)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="send generated/file events in batches of this size (0 = one request each; "
                             "with --rate: rate/10, at most 1000, i.e. ten requests a second)")
    parser.add_argument("--processor", help="processor of generated events; several, comma-separated, take "
                                            "turns (stripe,adyen,checkout)")
    parser.add_argument("--event-type", help="event_type of generated events")
    parser.add_argument("--failure-category", help="failure_category of generated events (of the failures, "
                                                   "with --failure-rate)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    traffic = parser.add_argument_group(
        "traffic", "Paced traffic for the risk consumer (docs/risk.md, \"Quick start\"): rate x duration events, "
        "one batch request per tick, never ahead of schedule and one request at a time (a slower node makes the "
        "run longer, the summary shows the rate reached); one progress line per --progress-interval.")
    traffic.add_argument("--rate", type=float, metavar="EVENTS_PER_S", help="send at this many events per second")
    traffic.add_argument("--duration", type=float, metavar="SECONDS", help="for this long (or give --count)")
    traffic.add_argument("--failure-rate", type=float, metavar="SHARE",
                         help=f"share of generated events that are {FAILED} (the rest {SUCCEEDED}), 0 to 1")
    traffic.add_argument("--merchants", type=int, metavar="N", help="spread generated events over N merchant hashes")
    traffic.add_argument("--seed", type=int, help="random seed of --failure-rate and --merchants (repeatable runs; "
                                                  "event ids stay unique)")
    traffic.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                         help="at most one progress line this often with --rate (default 10)")
    return parser


def _usage(message: str) -> CommandError:
    return CommandError(message, 2)


def _check_send_options(args: argparse.Namespace) -> None:
    """One CommandError (exit 2) naming the first bad option; see ``payflux send --help``."""
    def number(name: str, value: float | None, lo: float, hi: float, what: str) -> None:
        if value is not None and not (math.isfinite(value) and lo < value <= hi):
            raise _usage(f"{name} must be above {lo:g} and at most {hi:.15g} ({what})")

    number("--rate", args.rate, 0, MAX_RATE, "events per second")
    number("--duration", args.duration, 0, MAX_DURATION, "seconds")
    number("--timeout", args.timeout, 0, 3600, "seconds per request")
    number("--progress-interval", args.progress_interval, 0, MAX_DURATION, "seconds")
    if args.failure_rate is not None and not (math.isfinite(args.failure_rate) and 0 <= args.failure_rate <= 1):
        raise _usage("--failure-rate must be a share from 0 to 1 (0.05 = 5% of events fail)")
    if args.count is not None and not 1 <= args.count <= MAX_EVENTS:
        raise _usage(f"--count must be from 1 to {MAX_EVENTS}")
    if not 0 <= args.batch_size <= MAX_BATCH:
        raise _usage(f"--batch-size must be from 0 to {MAX_BATCH} (0 = one request per event)")
    if args.merchants is not None and not 1 <= args.merchants <= 10_000_000:
        raise _usage("--merchants must be from 1 to 10000000")
    if args.processor is not None and not all(_SLUG.match(p) for p in args.processor.split(",")):
        raise _usage("--processor must be processor names (slugs such as stripe), comma-separated")
    if args.duration is not None and args.rate is None:
        raise _usage("--duration needs --rate")
    if args.rate is not None and (args.duration is None) == (args.count is None) and not args.file:
        raise _usage("--rate needs one of --duration or --count" if args.count is None else
                     "--count can't be used with --duration (the count is rate x duration)")
    if args.file:
        generated = [f"--{name.replace('_', '-')}" for name in
                     ("count", "duration", "processor", "event_type", "failure_category", "failure_rate",
                      "merchants", "seed") if getattr(args, name) is not None]
        if generated:
            raise _usage(f"{generated[0]} shapes generated events; it can't be used with --file")
    if args.failure_rate is not None and args.event_type is not None:
        raise _usage("--event-type can't be used with --failure-rate (it picks the event types)")
    if args.rate is not None and args.duration is not None and round(args.rate * args.duration) < 1:
        raise _usage("--rate x --duration must be at least one event")
    if args.rate is not None and args.duration is not None and args.rate * args.duration > MAX_EVENTS:
        raise _usage(f"--rate x --duration must be at most {MAX_EVENTS} events")


def _generated_events(args: argparse.Namespace, total: int, rng: random.Random) -> Iterator[dict]:
    """``total`` sample events shaped by the options (processors take turns, merchants and failures random)."""
    processors = args.processor.split(",") if args.processor else None
    fixed = {k: v for k, v in (("event_type", args.event_type), ("failure_category", args.failure_category))
             if v is not None}
    codes = dict(FAILURE_CATEGORIES)
    for n in range(total):
        overrides = dict(fixed)
        if processors:
            overrides["processor"] = processors[n % len(processors)]
        if args.merchants is not None:
            overrides["merchant_id_hash"] = f"m_{rng.randrange(args.merchants):04d}_5f2b9c1e"
        if args.failure_rate is not None:
            if rng.random() < args.failure_rate:
                category = args.failure_category or rng.choice(FAILURE_CATEGORIES)[0]
                overrides.update(event_type=FAILED, failure_category=category,
                                 failure_code=codes.get(category, "card_declined"))
            else:
                overrides.update(event_type=SUCCEEDED, failure_category=None, failure_code=None)
        yield sample_event(n, **overrides)


def _batches(events: Iterable[dict], size: int) -> Iterator[list[dict]]:
    it = iter(events)
    while batch := list(itertools.islice(it, size)):
        yield batch


def send_paced(batches: Iterable[list], send_batch: Callable[[list], Any], rate: float,
               now: Callable[[], float], sleep: Callable[[float], None],
               after_batch: Callable[[float], None] | None = None) -> float:
    """
    Call ``send_batch`` for each batch at ``rate`` events per second; returns the seconds taken.

    A batch is due when the events before it are (``start + sent / rate``) and never goes
    earlier; one request at a time, so a node slower than the rate makes the run longer rather
    than piling up requests. After the last batch it waits out that batch's share of the time, so
    E events take E / rate seconds and back-to-back runs keep the rate. ``now``/``sleep`` are the
    clock (``time.monotonic``/``time.sleep``; tests pass a fake one); ``after_batch(elapsed)``
    is called after each request.
    """
    start = now()
    sent = 0
    for batch in batches:
        delay = start + sent / rate - now()
        if delay > 0:
            sleep(delay)
        send_batch(batch)
        sent += len(batch)
        if after_batch is not None:
            after_batch(now() - start)
    delay = start + sent / rate - now()
    if delay > 0:
        sleep(delay)
    return now() - start


class _SendTally:
    """Responses and events so far; the progress and summary lines of a paced run."""

    def __init__(self, total: int, rate: float) -> None:
        self.total = total
        self.rate = rate
        self.requests = 0
        self.events = 0
        self.failed = 0
        self.statuses: dict[int, int] = {}

    def add(self, status: int, batch: list) -> None:
        self.requests += 1
        self.events += len(batch)
        self.failed += sum(1 for e in batch if isinstance(e, dict) and e.get("event_type") == FAILED)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def ok(self) -> bool:
        return all(200 <= s < 300 for s in self.statuses)

    def line(self, elapsed: float) -> str:
        share = f"{100.0 * self.failed / self.events:.1f}" if self.events else "0.0"
        achieved = self.events / elapsed if elapsed > 0 else 0.0
        summary = ", ".join(f"{count}x {status}" for status, count in sorted(self.statuses.items()))
        return (f"{self.requests} requests ({self.events}/{self.total} events, {share}% {FAILED}) in {elapsed:.1f} s "
                f"= {achieved:.1f} events/s (target {self.rate:g}): {summary or 'no responses'}")


def _send_traffic(args: argparse.Namespace, events: Iterable[dict], total: int, base: str,
                  post: Callable[..., tuple[int, str]], now: Callable[[], float],
                  sleep: Callable[[float], None]) -> int:
    """The --rate mode: paced batch requests, a progress line at most every --progress-interval."""
    url = f"{base}/v1/events/payment_exhaust/batch"
    size = args.batch_size or max(1, min(1000, math.ceil(args.rate / 10)))
    tally = _SendTally(total, args.rate)
    errors_shown: set[int] = set()
    next_progress = args.progress_interval

    def send_batch(batch: list) -> None:
        status, text = post(url, b"\n".join(json.dumps(e).encode() for e in batch), "application/x-ndjson",
                            args.api_key, args.timeout)
        tally.add(status, batch)
        if not 200 <= status < 300 and status not in errors_shown:  # the first of each kind, not one per tick
            errors_shown.add(status)
            sys.stderr.write(f"payflux send: {status} {' '.join(text.split())[:300]}\n")

    def progress(elapsed: float) -> None:
        nonlocal next_progress
        if not args.quiet and elapsed >= next_progress and tally.events < total:
            print(f"progress: {tally.line(elapsed)}", flush=True)
            next_progress = elapsed + args.progress_interval

    started = now()
    try:
        elapsed = send_paced(_batches(events, size), send_batch, args.rate, now, sleep, progress)
    except (urllib.error.URLError, OSError) as e:
        sys.stderr.write(f"payflux send: cannot reach {base}: {getattr(e, 'reason', e)}\n")
        print(f"stopped: {tally.line(now() - started)}")
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {tally.line(now() - started)}", flush=True)
        raise
    print(f"sent {tally.line(elapsed)}")
    return 0 if tally.ok() else 1


def _send(argv: Sequence[str], post: Callable[..., tuple[int, str]] = _post,
          now: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    """``payflux send``; ``post`` (as :func:`_post`) and the ``now``/``sleep`` clock of --rate are
    parameters so tests run it against a fake node without waiting."""
    args = _send_parser().parse_args(list(argv))
    _check_send_options(args)
    if args.file:
        try:
            events: Iterable[dict] = _read_events(args.file)
        except (OSError, ValueError) as e:
            sys.stderr.write(f"payflux send: cannot read events from {args.file}: {e}\n")
            return 2
        total = len(events)  # type: ignore[arg-type]
    else:
        total = args.count if args.count is not None else 1
        if args.rate is not None and args.duration is not None:
            total = round(args.rate * args.duration)
        events = _generated_events(args, total, random.Random(args.seed))

    base = args.url.rstrip("/")
    if args.rate is not None:
        return _send_traffic(args, events, total, base, post, now, sleep)
    statuses: dict[int, int] = {}
    if args.batch_size > 0:
        requests: Iterable[tuple[str, bytes, str]] = (
            (f"{base}/v1/events/payment_exhaust/batch", b"\n".join(json.dumps(e).encode() for e in chunk),
             "application/x-ndjson") for chunk in _batches(events, args.batch_size))
    else:
        requests = ((f"{base}/v1/events/payment_exhaust", json.dumps(e).encode(), "application/json")
                    for e in events)
    sent = 0
    for url, body, content_type in requests:
        try:
            status, text = post(url, body, content_type, args.api_key, args.timeout)
        except (urllib.error.URLError, OSError) as e:
            sys.stderr.write(f"payflux send: cannot reach {base}: {getattr(e, 'reason', e)}\n")
            return 1
        sent += 1
        statuses[status] = statuses.get(status, 0) + 1
        if not args.quiet:
            print(status, text)
    summary = ", ".join(f"{count}x {status}" for status, count in sorted(statuses.items()))
    print(f"sent {sent} requests ({total} events): {summary}")
    return 0 if all(200 <= s < 300 for s in statuses) else 1


class CommandError(Exception):
    """One line for stderr and the exit status of a failed operator command."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        raise CommandError(f"{message} (see {self.prog} --help)", 2)


def _redis_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--config", help="TOML settings file (default: $PAYFLUX_CONFIG)")
    parser.add_argument("--redis-url", help="redis://, rediss:// or unix:// URL (default: settings, "
                                            "else the embedded Redis at <data_dir>/redis.sock)")
    parser.add_argument("--data-dir", help="data directory of the embedded Redis (default: settings)")
    parser.add_argument("--stream-prefix", help="key prefix (default: settings)")
    parser.add_argument("--partitions", help="number of partitions (default: settings)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for Redis")
    return parser


def _connect(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """(SyncRedis or SyncCluster, StreamKeys, partitions) from the options and the daemon's settings loader."""
    from payflux.config import ConfigError, load_settings
    from payflux.streams.keys import StreamKeys
    from payflux.streams.syncredis import open_sync

    # The CLI never authenticates producers: insecure_dev_mode only lifts the daemon's
    # "ingest needs API keys" check so an operator box without keys can use the CLI.
    overrides = {"redis_url": args.redis_url, "data_dir": args.data_dir, "stream_prefix": args.stream_prefix,
                 "partitions": args.partitions, "insecure_dev_mode": True}
    try:
        settings = load_settings(cli=overrides, config_path=args.config)
    except ConfigError as e:
        raise CommandError(str(e), 2) from None
    url = settings.redis_url
    if url is None:
        socket_path = os.path.join(os.path.abspath(settings.data_dir), "redis.sock")
        if not os.path.exists(socket_path):
            raise CommandError(f"no Redis URL configured and no embedded Redis socket at {socket_path} "
                               "(is the node running with this --data-dir? or pass --redis-url)")
        url = f"unix://{socket_path}"
    return open_sync(url, timeout=args.timeout), StreamKeys(settings.stream_prefix), settings.partitions


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _table(rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _cluster_nodes(redis: Any, streams: list[str]) -> dict[str, str]:
    """On a Redis Cluster: stream -> "host:port" of the master serving it (else empty)."""
    slots = getattr(redis, "slots", None)
    if slots is None:
        return {}
    from payflux.streams.cluster import key_slot

    owners = {s: slots.owner(key_slot(s)) for s in streams}
    return {s: f"{a[0]}:{a[1]}" if a else "unserved" for s, a in owners.items()}


def _stream(argv: Sequence[str]) -> int:
    from payflux.consumers.inspect import partition_steps, run_sync

    parser = _redis_parser("payflux stream", "Show streams, consumer groups and dead letters.")
    parser.add_argument("action", choices=["info"])
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(list(argv))
    redis, keys, partitions = _connect(args)
    with redis:
        now = time.time()
        facts = [run_sync(partition_steps(keys, p, now), redis.command) for p in range(partitions)]
        nodes = _cluster_nodes(redis, [f.stream for f in facts])
    if args.json:
        print(json.dumps({"partitions": [{**f.as_dict(), **({"node": nodes[f.stream]} if nodes else {})}
                                         for f in facts]}, indent=2))
        return 0
    for f in facts:
        where = f"  on {nodes[f.stream]}" if nodes else ""
        print(f"partition {f.partition}  {f.stream}{where}")
        print(f"  length {f.length}   first {f.first_id or '-'}   last {f.last_id or '-'}   "
              f"dead letters {f.dlq_depth} ({f.dlq})")
        if not f.groups:
            print("  no consumer groups")
            continue
        rows = [["group", "consumers", "pending", "lag", "last delivered", "oldest pending age"]]
        for g in f.groups:
            lag = "unknown" if g.lag is None else str(g.lag)
            rows.append([g.name, str(g.consumers), str(g.pending), lag, g.last_delivered_id,
                         _age(g.oldest_pending_age)])
        print("\n".join(_table(rows, "  ")))
    return 0


def _dlq_list(args: argparse.Namespace, redis: Any, keys: Any, partitions: int) -> int:
    from payflux.consumers.dlq import dlq_depths, list_dead_letters

    letters = list_dead_letters(redis, keys, partitions, args.limit)
    total = sum(dlq_depths(redis, keys, partitions).values())
    if args.json:
        print(json.dumps({"total": total, "dead_letters": [d.as_dict() for d in letters]}, indent=2))
        return 0
    if not letters:
        print("no dead letters")
        return 0
    rows = [["partition", "dlq id", "original id", "group", "deliveries", "dead-lettered at", "event id", "error"]]
    for d in letters:
        when = "-" if d.dead_lettered_at is None else datetime.fromtimestamp(
            d.dead_lettered_at / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        error = f"{d.error_class or '?'}: {d.error_message or ''}".replace("\n", " ")
        rows.append([str(d.partition), d.id, d.original_id or "-", d.group or "-",
                     "-" if d.deliveries is None else str(d.deliveries), when, d.event_id or "-",
                     error if len(error) <= 60 else error[:57] + "..."])
    print("\n".join(_table(rows)))
    print(f"{len(letters)} of {total} dead letters shown")
    return 0


def _dlq_replay(args: argparse.Namespace, redis: Any, keys: Any, partitions: int) -> int:
    from payflux.consumers.dlq import replay


    def progress(done: int, total: int) -> None:
        print(f"replayed {done}/{total}", file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        result = replay(redis, keys, partitions, ids=args.id or None, all=args.all, progress=progress,
                        partition=args.partition)
    except ValueError as e:
        raise CommandError(str(e), 2) from None
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        for p, dlq_id, new_id in result.replayed[:20] if args.all else result.replayed:
            print(f"replayed {dlq_id} (partition {p}) as {new_id}")
        for p, dlq_id, reason in result.skipped:
            print(f"skipped {dlq_id} (partition {p}): {reason}")
        for dlq_id in result.missing:
            print(f"not found {dlq_id}")
        print(f"{len(result.replayed)} replayed, {len(result.skipped)} skipped, {len(result.missing)} not found")
    return 0 if not result.missing and not result.skipped else 1


def _dlq_purge(args: argparse.Namespace, redis: Any, keys: Any, partitions: int) -> int:
    from payflux.consumers.dlq import purge

    counts = purge(redis, keys, partitions)
    if args.json:
        print(json.dumps({"purged": {str(p): n for p, n in counts.items()}, "total": sum(counts.values())}))
    else:
        print(f"purged {sum(counts.values())} dead letters from {partitions} partition(s)")
    return 0


def _dlq(argv: Sequence[str]) -> int:
    parser = _redis_parser("payflux dlq", "List, replay or purge dead letters.")
    parser.add_argument("action", choices=["list", "replay", "purge"])
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--limit", type=int, default=50, help="list: most entries shown (oldest first)")
    parser.add_argument("--id", action="append", default=[], metavar="ID",
                        help="replay: DLQ entry id (repeatable)")
    parser.add_argument("--all", action="store_true", help="replay: every dead letter")
    parser.add_argument("--partition", type=int, help="replay: only this partition's DLQ")
    parser.add_argument("--yes", action="store_true", help="confirm replay --all / purge")
    args = parser.parse_args(list(argv))
    if args.action != "replay" and (args.id or args.all or args.partition is not None):
        raise CommandError(f"--id, --all and --partition are options of replay, not {args.action}", 2)
    if args.action == "list" and args.limit < 1:
        raise CommandError("--limit must be at least 1", 2)
    if args.action == "replay" and bool(args.id) == args.all:
        raise CommandError("give --id ID (one or more) or --all", 2)
    if args.action == "replay" and args.all and not args.yes:
        raise CommandError("replaying every dead letter re-appends them all to the stream; add --yes", 2)
    if args.action == "purge" and not args.yes:
        raise CommandError("purge deletes every dead letter for good; add --yes", 2)
    redis, keys, partitions = _connect(args)
    with redis:
        action = {"list": _dlq_list, "replay": _dlq_replay, "purge": _dlq_purge}[args.action]
        return action(args, redis, keys, partitions)


COMMANDS = {"check-config": _check_config, "send": _send, "stream": _stream, "dlq": _dlq}
USAGE = ("usage: payflux {check-config,send,stream info,dlq list|replay|purge} [options]"
         "  (payflux COMMAND --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    from payflux.streams.syncredis import RedisConnectionError, RedisReplyError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        sys.stderr.write(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    prog = f"payflux {argv[0]}"
    try:
        return COMMANDS[argv[0]](argv[1:])
    except CommandError as e:
        sys.stderr.write(f"{prog}: {e}\n")
        return e.status
    except RedisConnectionError as e:
        sys.stderr.write(f"{prog}: {e}\n")
        return 1
    except RedisReplyError as e:
        sys.stderr.write(f"{prog}: Redis refused: {e}\n")
        return 1
    except ValueError as e:  # bad URL, bad id, a key of the wrong type
        sys.stderr.write(f"{prog}: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as e:  # still one line, never a traceback, for the operator
        sys.stderr.write(f"{prog}: unexpected error {type(e).__name__}: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
