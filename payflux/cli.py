"""
The ``payflux`` operator command.

- ``payflux check-config [node options]``: validate settings exactly as ``twistd payflux`` would
  (file < env < options) and print them with secrets redacted; exit 2 on the first bad option.
- ``payflux send``: post a sample event, N generated events, or a file of events (NDJSON, or a
  JSON array) to a running node and print each response.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Sequence

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


def _send(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="payflux send", description="Post payment_exhaust events to a node.")
    parser.add_argument("--url", default=os.environ.get("PAYFLUX_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--api-key", default=os.environ.get("PAYFLUX_API_KEY"),
                        help="API key secret (default: $PAYFLUX_API_KEY; none in dev mode)")
    parser.add_argument("--file", help="NDJSON or JSON-array file of events ('-' = stdin)")
    parser.add_argument("--count", type=int, default=1, help="generated sample events to send")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="send generated/file events in batches of this size (0 = one request each)")
    parser.add_argument("--processor", help="processor of generated events")
    parser.add_argument("--event-type", help="event_type of generated events")
    parser.add_argument("--failure-category", help="failure_category of generated events")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(list(argv))

    if args.file:
        try:
            events = _read_events(args.file)
        except (OSError, ValueError) as e:
            sys.stderr.write(f"payflux send: cannot read events from {args.file}: {e}\n")
            return 2
    else:
        overrides = {"processor": args.processor, "event_type": args.event_type,
                     "failure_category": args.failure_category}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        events = [sample_event(n, **overrides) for n in range(args.count)]

    base = args.url.rstrip("/")
    statuses: dict[int, int] = {}
    if args.batch_size > 0:
        chunks = [events[i:i + args.batch_size] for i in range(0, len(events), args.batch_size)]
        requests = [(f"{base}/v1/events/payment_exhaust/batch",
                     b"\n".join(json.dumps(e).encode() for e in chunk), "application/x-ndjson") for chunk in chunks]
    else:
        requests = [(f"{base}/v1/events/payment_exhaust", json.dumps(e).encode(), "application/json")
                    for e in events]
    for url, body, content_type in requests:
        try:
            status, text = _post(url, body, content_type, args.api_key, args.timeout)
        except (urllib.error.URLError, OSError) as e:
            sys.stderr.write(f"payflux send: cannot reach {base}: {getattr(e, 'reason', e)}\n")
            return 1
        statuses[status] = statuses.get(status, 0) + 1
        if not args.quiet:
            print(status, text)
    summary = ", ".join(f"{count}x {status}" for status, count in sorted(statuses.items()))
    print(f"sent {len(requests)} requests ({len(events)} events): {summary}")
    return 0 if all(200 <= s < 300 for s in statuses) else 1


COMMANDS = {"check-config": _check_config, "send": _send}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        sys.stderr.write("usage: payflux {check-config,send} [options]  (payflux COMMAND --help)\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
