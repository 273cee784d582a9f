"""
The ``payflux`` operator command.

- ``payflux serve [node options]``: run the node in the foreground, exactly ``twistd -n payflux``
  (same options, exit statuses and signals; no pidfile; logs on stdout per ``log_format``).
- ``payflux check-config [node options]``: validate settings exactly as ``twistd payflux`` would
  (file < env < options; the consumers' handlers built as the node builds them) and print them
  with secrets redacted; exit 2 on the first bad option.
- ``payflux send``: post a sample event, N generated events, or a file of events (NDJSON, or a
  JSON array) to a running node and print each response; or, with ``--rate`` and ``--duration``,
  paced traffic (``--failure-rate``, ``--merchants``) for trying the risk consumer (docs/risk.md).
- ``payflux stream info``: per partition: length, first/last id, groups (consumers, pending, lag,
  last read, oldest pending age; stale ones named) and DLQ depth.
- ``payflux group list|delete``: consumer groups (lag, pending, consumers, last read, stale ones
  flagged by ``group_idle_warning``); delete one nobody uses (refused while it has lag, pending
  entries or recent readers, unless ``--force``).
- ``payflux dlq list|replay|purge``: inspect, re-append or delete dead letters.
- ``payflux risk report [--since T]``: per alert type, from the alert store: alerts raised,
  outcomes recorded, the share followed by a processor action, the median and p90 lead time,
  alerts with no outcome (docs/risk.md, "Lead time and the risk report").
- ``payflux --help`` lists every command with one line each; ``payflux --version`` prints the
  installed version; an unknown command is one line and exit 2.

The Redis commands take ``--redis-url``, ``--stream-prefix``, ``--partitions``, ``--layout`` and ``--data-dir``,
defaulting from the daemon's settings (``--config`` TOML file, ``PAYFLUX_*`` env); with no Redis
URL configured they use the embedded Redis socket ``<data_dir>/redis.sock``.  People get
tables, scripts get ``--json``; every failure is one line on stderr and a non-zero exit
(1 = Redis failed or refused, 2 = bad usage or configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Sequence

from twisted.python import usage

from payflux.commandline import CommandError, OneLineParser
from payflux.send import _send, sample_event  # noqa: F401 - sample_event: tests and bench import it from here


def _serve(argv: Sequence[str]) -> int:
    """``payflux serve [node options]``: the daemon in the foreground (``twistd -n payflux``'s options)."""
    from payflux.tap import serve

    return serve(argv)


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
    if "consumers" in settings.roles:
        # build the handlers as the node would (makeService), so a bad one fails here too
        from twisted.internet import reactor

        from payflux.consumers.handlers import HandlerError, build_handlers

        try:
            build_handlers(settings.consumers, reactor)
        except HandlerError as e:
            sys.stderr.write(f"payflux: {e}\n")
            return 2
    print("configuration OK")
    for option in OPTIONS:
        value = getattr(settings, option.name)
        if option.name in ("api_keys", "admin_keys"):
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


def _redis_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("--config", help="TOML settings file (default: $PAYFLUX_CONFIG)")
    parser.add_argument("--redis-url", help="redis://, rediss:// or unix:// URL (default: settings, "
                                            "else the embedded Redis at <data_dir>/redis.sock)")
    parser.add_argument("--data-dir", help="data directory of the embedded Redis (default: settings)")
    parser.add_argument("--stream-prefix", help="key prefix (default: settings)")
    parser.add_argument("--partitions", help="number of partitions (default: settings)")
    parser.add_argument("--layout", help="key layout, payflux or seed (default: settings)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for Redis")
    return parser


def _settings(args: argparse.Namespace) -> Any:
    """The daemon's settings (file < env < these options), as the Redis commands see them."""
    from payflux.config import ConfigError, load_settings

    # The CLI never authenticates producers: insecure_dev_mode only lifts the daemon's
    # "ingest needs API keys" check so an operator box without keys can use the CLI.
    overrides = {"redis_url": args.redis_url, "data_dir": args.data_dir, "stream_prefix": args.stream_prefix,
                 "partitions": args.partitions, "layout": args.layout, "insecure_dev_mode": True}
    try:
        return load_settings(cli=overrides, config_path=args.config)
    except ConfigError as e:
        raise CommandError(str(e), 2) from None


def _connect(args: argparse.Namespace, settings: Any = None) -> tuple[Any, Any, int]:
    """(SyncRedis or SyncCluster, StreamKeys, partitions) from the options and the daemon's settings loader."""
    from payflux.streams.keys import StreamKeys
    from payflux.redis.connect import open_sync

    if settings is None:
        settings = _settings(args)
    url = settings.redis_url
    if url is None:
        socket_path = os.path.join(os.path.abspath(settings.data_dir), "redis.sock")
        if not os.path.exists(socket_path):
            raise CommandError(f"no Redis URL configured and no embedded Redis socket at {socket_path} "
                               "(is the node running with this --data-dir? or pass --redis-url)")
        url = f"unix://{socket_path}"
    keys = StreamKeys(settings.stream_prefix, layout=settings.layout)
    return open_sync(url, timeout=args.timeout), keys, settings.partitions


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
    from payflux.redis.slots import key_slot

    owners = {s: slots.owner(key_slot(s)) for s in streams}
    return {s: f"{a[0]}:{a[1]}" if a else "unserved" for s, a in owners.items()}


def _partition_facts(redis: Any, keys: Any, partitions: int) -> list:
    """Every partition's facts (stream, groups, DLQ), read now through the CLI's client."""
    from payflux.consumers.inspect import partition_steps
    from payflux.redis.steps import run_sync

    now = time.time()
    return [run_sync(partition_steps(keys, p, now), redis.command) for p in range(partitions)]


def _stream(argv: Sequence[str]) -> int:
    parser = _redis_parser("payflux stream", "Show streams, consumer groups and dead letters.")
    parser.add_argument("action", choices=["info"])
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(list(argv))
    settings = _settings(args)
    warning = settings.group_idle_warning
    redis, keys, partitions = _connect(args, settings)
    with redis:
        facts = _partition_facts(redis, keys, partitions)
        nodes = _cluster_nodes(redis, [f.stream for f in facts])
    if args.json:
        out = []
        for f in facts:
            doc = {**f.as_dict(), **({"node": nodes[f.stream]} if nodes else {})}
            for g, gdoc in zip(f.groups, doc["groups"]):
                gdoc["stale"] = _stale(g.idle, warning)
            out.append(doc)
        print(json.dumps({"group_idle_warning": warning, "partitions": out}, indent=2))
        return 0
    stale: dict[str, float] = {}
    for f in facts:
        where = f"  on {nodes[f.stream]}" if nodes else ""
        print(f"partition {f.partition}  {f.stream}{where}")
        print(f"  length {f.length}   first {f.first_id or '-'}   last {f.last_id or '-'}   "
              f"dead letters {f.dlq_depth} ({f.dlq})")
        if not f.groups:
            print("  no consumer groups")
            continue
        rows = [["group", "consumers", "pending", "lag", "last delivered", "last read", "oldest pending age"]]
        for g in f.groups:
            lag = "unknown" if g.lag is None else str(g.lag)
            rows.append([g.name, str(g.consumers), str(g.pending), lag, g.last_delivered_id, _ago(g.idle),
                         _age(g.oldest_pending_age)])
            if _stale(g.idle, warning):
                stale[g.name] = min(g.idle, stale.get(g.name, g.idle))
        print("\n".join(_table(rows, "  ")))
    for name, idle in stale.items():
        print(f"stale group {name}: not read for {_age(idle)} (group_idle_warning {_age(warning)}); "
              f"if nothing uses it any more: payflux group delete {name}")
    return 0


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{_age(seconds)} ago"


def _stale(idle: float | None, warning: float) -> bool:
    """A group nobody has read (or claimed) for longer than ``group_idle_warning``."""
    return idle is not None and idle > warning


#: A group some consumer read this recently (or within group_idle_warning, if shorter) is in use:
#: a running consumer reads at least every block_ms (at most 60 s) and, if its group is deleted,
#: recreates it at start_id and reads the stream again.
ACTIVE_WITHIN = 120.0


def _group_rows(facts: list, warning: float) -> list[dict[str, Any]]:
    rows = []
    for f in facts:
        for g in f.groups:
            rows.append({"group": g.name, "partition": f.partition, "stream": f.stream, "consumers": g.consumers,
                         "pending": g.pending, "lag": g.lag, "last_delivered_id": g.last_delivered_id,
                         "idle": g.idle, "stale": _stale(g.idle, warning)})
    rows.sort(key=lambda r: (r["group"], r["partition"]))
    return rows


def _group_list(args: argparse.Namespace, facts: list, warning: float) -> int:
    rows = _group_rows(facts, warning)
    if args.json:
        print(json.dumps({"group_idle_warning": warning, "groups": rows}, indent=2))
        return 0
    if not rows:
        print("no consumer groups")
        return 0
    table = [["group", "stream", "consumers", "pending", "lag", "last delivered", "last read", "state"]]
    for r in rows:
        state = "stale" if r["stale"] else ("no consumers" if r["idle"] is None else "ok")
        table.append([r["group"], r["stream"], str(r["consumers"]), str(r["pending"]),
                      "unknown" if r["lag"] is None else str(r["lag"]), r["last_delivered_id"], _ago(r["idle"]),
                      state])
    print("\n".join(_table(table)))
    stale = sorted({r["group"] for r in rows if r["stale"]})
    names = sorted({r["group"] for r in rows})
    print(f"{len(names)} group(s); stale (not read for over {_age(warning)}, group_idle_warning): "
          f"{', '.join(stale) or 'none'}")
    return 0


def _group_delete(args: argparse.Namespace, facts: list, redis: Any, settings: Any) -> int:
    name = args.name
    found = [(f, g) for f in facts for g in f.groups if g.name == name]
    if not found:
        raise CommandError(f"no consumer group {name!r} on any of the {len(facts)} partition(s) "
                           "(see payflux group list)", 1)
    reasons = []
    for f, g in found:
        why = []
        if g.lag is None:
            why.append("lag unknown")
        elif g.lag:
            why.append(f"lag {g.lag}")
        if g.pending:
            why.append(f"{g.pending} pending")
        if why:
            reasons.append(f"partition {f.partition}: {', '.join(why)}")
    idle = [g.idle for _, g in found if g.idle is not None]
    if idle and min(idle) < min(ACTIVE_WITHIN, settings.group_idle_warning):
        reasons.append(f"a consumer read it {_age(min(idle))} ago (a running consumer recreates it at its "
                       "start_id and reads the stream again)")
    configured = [c.name for c in settings.consumers if c.group == name]
    if configured:
        reasons.append(f"[[consumers]] {', '.join(map(repr, configured))} of this configuration read it")
    if reasons and not args.force:
        raise CommandError(f"refusing to delete group {name!r}: {'; '.join(reasons)} "
                           "(add --force to delete it anyway: its position and pending entries are lost)", 1)
    deleted = [f.partition for f, _ in found if int(redis.command("XGROUP", "DESTROY", f.stream, name))]
    if args.json:
        print(json.dumps({"deleted": name, "partitions": deleted, "forced": bool(reasons)}))
    else:
        print(f"deleted group {name} from {len(deleted)} partition(s)" + (" (forced)" if reasons else ""))
    return 0


def _group(argv: Sequence[str]) -> int:
    parser = _redis_parser("payflux group", "List consumer groups (lag, pending, consumers, last read; stale "
                                            "ones flagged) or delete one.")
    parser.add_argument("action", choices=["list", "delete"])
    parser.add_argument("name", nargs="?", help="delete: the group to delete")
    parser.add_argument("--force", action="store_true",
                        help="delete: even with lag, pending entries or recent reads (they are lost)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(list(argv))
    if args.action == "delete" and not args.name:
        raise CommandError("delete needs the group name: payflux group delete NAME", 2)
    if args.action == "list" and (args.name or args.force):
        raise CommandError("list takes no group name and no --force", 2)
    settings = _settings(args)
    redis, keys, partitions = _connect(args, settings)
    with redis:
        facts = _partition_facts(redis, keys, partitions)
        if args.action == "list":
            return _group_list(args, facts, settings.group_idle_warning)
        return _group_delete(args, facts, redis, settings)


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


    def progress(handled: int, total: int, replayed: int) -> None:
        print(f"progress: {handled}/{total} handled, {replayed} replayed", file=sys.stderr if args.json else sys.stdout,
              flush=True)

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


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since_ms(text: str | None, now: float) -> int | None:
    """``--since``: RFC 3339, or a duration ago (``90s``, ``30m``, ``24h``, ``7d``); None = everything."""
    from payflux.risk.store import rfc3339_ms

    if text is None:
        return None
    value = text.strip()
    unit = value[-1:].lower()
    if unit in _DURATION and value[:-1].isdigit() and len(value) <= 12:
        return int((now - int(value[:-1]) * _DURATION[unit]) * 1000)
    try:
        return rfc3339_ms(value)
    except ValueError:
        raise CommandError(f"--since must be an RFC 3339 time (2026-01-06T00:00:00Z) or a duration such as "
                           f"30m, 24h or 7d, got {text!r}", 2) from None


def _lead(seconds: float | None) -> str:
    return "-" if seconds is None else ("-" + _age(-seconds) if seconds < 0 else _age(seconds))


def _risk_report(args: argparse.Namespace) -> int:
    from payflux.redis.steps import run_sync
    from payflux.risk.alerts import iso_ms
    from payflux.risk.report import summarize
    from payflux.risk.store import AlertKeys, since_steps

    now = time.time()
    since = _since_ms(args.since, now)
    settings = _settings(args)
    redis, _, _ = _connect(args, settings)
    with redis:
        docs = run_sync(since_steps(AlertKeys(settings.stream_prefix), since), redis.command)
    report = summarize(docs)
    if args.json:
        print(json.dumps({"since": None if since is None else iso_ms(since), "generated_at": iso_ms(int(now * 1000)),
                          **report}, indent=2))
        return 0
    scope = "every stored alert" if since is None else f"alerts opened since {iso_ms(since)}"
    print(f"risk report: {scope} (retention {settings.alerts_retention_days} days)")
    rows = [["type", "alerts", "outcomes", "followed by action", "share", "lead time median", "lead time p90",
             "no outcome"]]
    for name, r in [*report["by_type"].items(), ("all", report["all"])]:
        share = "-" if r["action_share"] is None else f"{r['action_share'] * 100:.0f}%"
        rows.append([name, str(r["alerts"]), str(r["outcomes"]), str(r["followed_by_action"]), share,
                     _lead(r["lead_time_median_seconds"]), _lead(r["lead_time_p90_seconds"]), str(r["no_outcome"])])
    print("\n".join(_table(rows)))
    print("lead time: from an alert opening to the first processor action recorded for it (an outcome other "
          "than none)")
    return 0


def _risk(argv: Sequence[str]) -> int:
    parser = _redis_parser("payflux risk", "Lead time and precision of the risk consumer's alerts, from the "
                                           "alert store.")
    parser.add_argument("action", choices=["report"])
    parser.add_argument("--since", help="alerts opened at or after this: RFC 3339 (2026-01-06T00:00:00Z) or a "
                                        "duration ago (30m, 24h, 7d); default: every stored alert")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(list(argv))
    return _risk_report(args)


COMMANDS = {"serve": _serve, "check-config": _check_config, "send": _send, "stream": _stream,
            "group": _group, "dlq": _dlq, "risk": _risk}

#: One line per command (and action) for ``payflux --help``, in the order shown.
SUMMARIES: dict[str, list[tuple[str, str]]] = {
    "serve": [("serve", "run the node in the foreground (twistd -n payflux, same options)")],
    "check-config": [("check-config", "validate settings as the daemon would; print them, secrets redacted")],
    "send": [("send", "post a sample, generated or file events (or paced traffic) to a node")],
    "stream": [("stream info", "per partition: length, first/last id, groups (lag, pending, last read), DLQ")],
    "group": [("group list", "consumer groups: lag, pending, consumers, last delivered/read; stale flagged"),
              ("group delete", "delete a consumer group (refused with lag, pending or readers, unless --force)")],
    "dlq": [("dlq list", "dead letters: original id, group, deliveries, error"),
            ("dlq replay", "put dead letters back on the stream (--id ID, or --all --yes)"),
            ("dlq purge", "delete every dead letter (--yes)")],
    "risk": [("risk report", "alerts raised, outcomes, share followed by action, lead time (--since 24h)")],
}


def version() -> str:
    """The installed package's version (setup.py), via importlib.metadata."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("payflux")
    except PackageNotFoundError:
        return "unknown (not installed)"


def help_text() -> str:
    lines = [line for name in COMMANDS for line in SUMMARIES[name]]
    width = max(len(n) for n, _ in lines)
    return "\n".join([
        "usage: payflux COMMAND [options]    (payflux COMMAND --help: its options)",
        "",
        "PayFlux operator command.  Redis commands read the node's settings (--config, PAYFLUX_*).",
        "",
        "commands:",
        *(f"  {n.ljust(width)}  {text}" for n, text in lines),
        "",
        "options:",
        f"  {'-h, --help'.ljust(width)}  show this help",
        f"  {'--version'.ljust(width)}  print the version",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    from payflux.redis.sync import RedisConnectionError, RedisReplyError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(help_text())
        return 0
    if argv and argv[0] == "--version":
        print(f"payflux {version()}")
        return 0
    if not argv:
        sys.stderr.write(help_text())
        return 2
    if argv[0] not in COMMANDS:
        kind = "option" if argv[0].startswith("-") else "command"
        sys.stderr.write(f"payflux: unknown {kind} {argv[0]!r} (see payflux --help)\n")
        return 2
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
