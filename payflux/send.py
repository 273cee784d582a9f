"""
``payflux send``: post events to a running node — one sample event, N generated ones, a file of
events (NDJSON or a JSON array), or, with ``--rate`` and ``--duration``, paced traffic with a
chosen failure share over several processors and merchants (``--failure-rate``,
``--merchants``) for trying the risk consumer (docs/risk.md, "Quick start").

:func:`_send` is the command (``payflux.cli`` dispatches to it); its HTTP ``post`` and the
``now``/``sleep`` clock of ``--rate`` are parameters so tests run it against a fake node without
waiting.  Usage errors are :class:`payflux.commandline.CommandError` (exit 2).
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
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Sequence

from payflux.commandline import CommandError, OneLineParser

def sample_event(n: int = 0, **overrides) -> dict:
    """A valid payment_exhaust event with every field of the seed's schema (docs/events.md; a
    failed payment, as docs/sample-event.json) plus PayFlux's optional currency, failure_code and
    processor_latency_ms; ``overrides`` replace fields (None removes one)."""
    event = {
        "event_type": "payment_failed",
        "event_timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "event_id": str(uuid.uuid4()),
        "merchant_id_hash": f"m_{n % 50:04d}_5f2b9c1e",
        "payment_intent_id_hash": secrets.token_urlsafe(16),
        "processor": "stripe",
        "failure_category": "insufficient_funds",
        "retry_count": 0,
        "geo_bucket": "US",
        "amount_bucket": "10-50",
        "system_source": "checkout_api",
        "payment_method_bucket": "credit_card",
        "channel": "web",
        "retry_result": "failed",
        "failure_origin": "issuer",
        "currency": "USD",
        "failure_code": "card_declined",
        "processor_latency_ms": 230,
    }
    for key, value in overrides.items():
        if value is None:
            event.pop(key, None)
        else:
            event[key] = value
    return event


def _post(url: str, body: bytes, content_type: str, api_key: str | None, timeout: float) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def node_url(value: str) -> str:
    """
    The base URL of ``--url``, without a trailing slash: ``http(s)://host[:port][/path]`` as
    given, and the short forms ``host:port``, ``host:port/path``, ``host`` and ``:port``
    (127.0.0.1) as ``http://...``.  CommandError (exit 2) for anything else.
    """
    from urllib.parse import urlsplit

    text = value.strip()
    url = text if _SCHEME.match(text) else "http://" + ("127.0.0.1" + text if text.startswith(":") else text)
    wrong = f"--url {value!r}: expected http://host:port[/path] (or host:port, :port)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that isn't a number in 0-65535
    except ValueError:
        raise CommandError(wrong, 2) from None
    if parts.scheme not in ("http", "https"):
        raise CommandError(f"--url {value!r}: only http:// and https:// are supported", 2)
    if not parts.hostname or parts.query or parts.fragment:
        raise CommandError(wrong, 2)
    return url.rstrip("/")


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
#: the failure categories (with a matching failure_code, and the failure_origin of FAILURE_ORIGINS)
#: failures are spread over evenly, as in bench/risk.py, so failure_cluster sees four categories
#: (and two origins) sharing a processor's failures.  A success carries retry_result "success" and
#: no failure_category, failure_code or failure_origin.
FAILED, SUCCEEDED = "payment_failed", "payment_succeeded"
FAILURE_CATEGORIES = (("insufficient_funds", "card_declined"), ("do_not_honor", "do_not_honor"),
                      ("timeout", "processor_timeout"), ("fraud_suspected", "suspected_fraud"))
FAILURE_ORIGINS = {"insufficient_funds": "issuer", "do_not_honor": "issuer", "timeout": "processor",
                   "fraud_suspected": "issuer"}  # any other --failure-category: "processor"
MAX_RATE = 1_000_000.0              # events per second
MAX_DURATION = 86_400.0             # seconds
MAX_BATCH = 10_000                  # events per request (the node's own cap: max_batch_events)
MAX_EVENTS = 100_000_000            # events per run
_SLUG = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _send_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="payflux send", description="Post payment_exhaust events to a node: a sample event, N generated "
        "events, a file of events, or paced traffic (--rate with --duration or --count).")
    parser.add_argument("--url", default=os.environ.get("PAYFLUX_URL", "http://127.0.0.1:8080"),
                        help="the node: http(s)://host:port[/path], or host:port, :port "
                             "(default: $PAYFLUX_URL, else http://127.0.0.1:8080)")
    parser.add_argument("--api-key", default=os.environ.get("PAYFLUX_API_KEY"),
                        help="API key secret (default: $PAYFLUX_API_KEY; none in dev mode)")
    parser.add_argument("--file", help="NDJSON or JSON-array file of events ('-' = stdin)")
    parser.add_argument("--count", type=int, help="generated sample events to send (default 1)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="send generated/file events in batches of this size (0 = one request each; "
                             "with --rate: rate/10, at most 1000, i.e. ten requests a second)")
    parser.add_argument("--processor", help="processor of generated events; several, comma-separated, take "
                                            "turns (stripe,adyen,checkout)")
    parser.add_argument("--event-type", help="event_type of generated events (payment_succeeded: without "
                                             "the failure fields, retry_result success)")
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


def _failure_fields(category: str) -> dict:
    """The failure fields of a generated failure in ``category``."""
    return dict(failure_category=category, failure_code=dict(FAILURE_CATEGORIES).get(category, "card_declined"),
                failure_origin=FAILURE_ORIGINS.get(category, "processor"), retry_result="failed")


#: The fields of a generated success: no failure fields (absent), the attempt succeeded.
SUCCESS_FIELDS = dict(failure_category=None, failure_code=None, failure_origin=None, retry_result="success")


def _generated_events(args: argparse.Namespace, total: int, rng: random.Random) -> Iterator[dict]:
    """``total`` sample events shaped by the options (processors take turns, merchants and failures
    random).  ``--event-type payment_succeeded`` makes successes (no failure fields), as the
    successes of --failure-rate; any other --event-type keeps the failure fields."""
    processors = args.processor.split(",") if args.processor else None
    fixed: dict = {}
    if args.failure_category is not None:
        fixed.update(_failure_fields(args.failure_category))
    if args.event_type is not None:
        fixed["event_type"] = args.event_type
        if args.event_type == SUCCEEDED:
            fixed.update(SUCCESS_FIELDS)
    for n in range(total):
        overrides = dict(fixed)
        if processors:
            overrides["processor"] = processors[n % len(processors)]
        if args.merchants is not None:
            overrides["merchant_id_hash"] = f"m_{rng.randrange(args.merchants):04d}_5f2b9c1e"
        if args.failure_rate is not None:
            if rng.random() < args.failure_rate:
                overrides.update(event_type=FAILED,
                                 **_failure_fields(args.failure_category or rng.choice(FAILURE_CATEGORIES)[0]))
            else:
                overrides.update(event_type=SUCCEEDED, **SUCCESS_FIELDS)
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

    base = node_url(args.url)
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
