"""``trainhealth serve``, ``trainhealth replay`` and ``trainhealth report``."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import socket
import sys
from typing import Any, Callable, Mapping, Sequence

from . import jsonout
from .config import ConfigError, Settings, load

log = logging.getLogger("trainhealth")


LOG_LEVELS = ("debug", "info", "warning", "error")
PLACEHOLDER_TOKEN = "change-me-to-a-long-random-string"  # trainhealth.env.example's
MIN_TOKEN_CHARS = 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainhealth", description=(
        "Watch distributed PyTorch training: 'serve' runs the sidecar (POST records to /v1/ingest), "
        "'replay' runs the same detectors over recorded .jsonl files, 'report' draws them as one HTML file. "
        "Use COMMAND --help for the options."))
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the sidecar (binds to 127.0.0.1 unless told otherwise)")
    s.add_argument("--host", help="address to bind (TRAINHEALTH_HOST; default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (TRAINHEALTH_PORT; default 9464; 0 picks a free one)")
    s.add_argument("--webhook", dest="webhooks", action="append", default=[],
                   help="POST alerts to this URL; repeatable (TRAINHEALTH_WEBHOOK, comma-separated)")
    s.add_argument("--alertmanager", help="Alertmanager base URL (TRAINHEALTH_ALERTMANAGER)")
    s.add_argument("--db", help="SQLite file (TRAINHEALTH_DB; default ./trainhealth.db)")
    s.add_argument("--config", help="TOML file with thresholds; reloaded on SIGHUP and POST /-/reload")
    s.add_argument("--record", dest="record_dir", help="flight recorder: append records to DIR/RUN.jsonl")
    s.add_argument("--token", help="require Authorization: Bearer TOKEN (TRAINHEALTH_TOKEN); visible to ps: "
                   "prefer --token-file")
    s.add_argument("--token-file", metavar="PATH", help="read the token from this file (its first line)")
    s.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                   help="also answer requests sent to this host name (a Compose service, a proxy); repeatable; "
                        "'*' for any (TRAINHEALTH_ALLOWED_HOSTS, comma-separated). Others get a 421: DNS "
                        "rebinding (docs/operations.md)")
    s.add_argument("--log-level", choices=LOG_LEVELS, help="TRAINHEALTH_LOG_LEVEL; default info")
    r = sub.add_parser("replay", help="run the detectors over recorded .jsonl files")
    r.add_argument("files", nargs="+", help=".jsonl or .jsonl.gz files of records, or folders of them")
    r.add_argument("--config", help="TOML file with thresholds to try")
    r.add_argument("--until", type=float, metavar="SECONDS",
                   help="after the last record, let SECONDS pass with no records (the server's timer "
                        "ticking every second), so a hang or a silent rank at the end of a recording is reported "
                        "as the live sidecar would then (docs/liveness.md, 'The end of a recording')")
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="replay the runs in N processes at once (files grouped by the run they are named after, "
                        "RUN.jsonl as the flight recorder writes them); each run's alerts are the same")
    o = sub.add_parser("report", help="write a self-contained HTML post-mortem of recorded .jsonl files")
    o.add_argument("files", nargs="+", help=".jsonl or .jsonl.gz files of records, or folders of them "
                   "(e.g. serve --record's)")
    o.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default report.html)")
    o.add_argument("--config", help="TOML file with thresholds (as for replay)")
    o.add_argument("--until", type=float, metavar="SECONDS", help="as for replay: let SECONDS pass after the "
                   "last record, so a hang or a silent rank at the end is in the timeline")
    d = sub.add_parser("redeliver", help="send undelivered alert notifications again (a running sidecar)")
    d.add_argument("alert_ids", nargs="*", type=int, metavar="ALERT_ID", help="these alerts' (default: all)")
    d.add_argument("--url", default="http://127.0.0.1:9464", help="the sidecar (default http://127.0.0.1:9464)")
    d.add_argument("--target", help="only notifications to this target (its name in GET /v1/alerts)")
    d.add_argument("--token", help="Authorization: Bearer TOKEN (TRAINHEALTH_TOKEN)")
    la = sub.add_parser("launch", help="run one rank under the watcher that reports how it dies, e.g. "
                        "torchrun ... $(which trainhealth) launch python train.py (docs/liveness.md, 'Deaths')")
    la.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND ...", help="the rank's command")
    return p


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    try:
        if args.command == "serve":
            flags = {k: getattr(args, k) for k in ("host", "port", "webhooks", "alertmanager", "db",
                                                   "record_dir", "token", "allowed_hosts")}
            if args.token_file is not None:
                if args.token is not None:
                    raise ConfigError("--token-file: give --token or --token-file, not both")
                flags["token"] = read_token(args.token_file)
            settings = load(args.config, flags, environ)
            level = args.log_level or environ.get("TRAINHEALTH_LOG_LEVEL") or "info"
            if level not in LOG_LEVELS:
                raise ConfigError(f"TRAINHEALTH_LOG_LEVEL: must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
            return serve(settings, lambda: load(args.config, flags, environ), level)
        if args.command == "launch":
            from .trainer.launch import main as launch

            launch(list(args.cmd))  # exits as the rank did
        if args.command == "redeliver":
            from .notify.redeliver import redeliver

            return redeliver(args.url, args.alert_ids, args.target, args.token or environ.get("TRAINHEALTH_TOKEN"))
        settings = load(args.config, {}, {})
        if args.until is not None and not args.until >= 0:
            raise ConfigError(f"--until: must be >= 0 seconds, got {args.until!r}")
        if args.command == "report":
            return report(args.files, args.output, settings, args.until)
        if args.jobs < 1:
            raise ConfigError(f"--jobs: must be >= 1, got {args.jobs}")
        return replay(args.files, settings, args.until, args.jobs)
    except ConfigError as exc:
        print(f"trainhealth: {exc}", file=sys.stderr)
        return 2


def replay(files: Sequence[str], settings: Settings, until: float | None = None, jobs: int = 1) -> int:
    from .pipeline import Pipeline
    from .pipeline import replay as run_replay
    from .replay import ReadStats, read_files
    from .replay_parallel import groups, replay_parallel

    found = record_files("replay", files)
    if found is None:
        return 2
    files = found
    out = sys.stdout
    if jobs > 1 and len(groups(files)) > 1:
        part = replay_parallel(files, settings, until, jobs)
        stats = part.stats
        for _, line in part.alerts:
            out.write(line + "\n")
    else:  # streamed: each alert printed as it happens
        stats = ReadStats()
        pipeline = Pipeline(settings.detectors, settings.limits, settings.server.tick_seconds)
        for alert in run_replay(read_files(files, stats), pipeline, until=until, refreshes=True):
            out.write(jsonout.dumps(alert) + "\n")
    out.flush()
    msg = f"trainhealth replay: {stats.records} records, {stats.skipped} corrupt lines skipped"
    print(msg, file=sys.stderr)
    for err in stats.first_errors:
        print(f"  skipped {err}", file=sys.stderr)
    if not stats.records:  # an empty or wholly corrupt recording is not a clean bill of health
        print(f"trainhealth replay: no record read from {', '.join(files)}; nothing was checked", file=sys.stderr)
        return 1
    return 0


def report(files: Sequence[str], output: str, settings: Settings, until: float | None = None) -> int:
    from .page import report as report_mod

    found = record_files("report", files)
    if found is None:
        return 2
    body, stats = report_mod.build(found, settings, until)
    if not stats.records:
        why = f" ({stats.skipped} lines skipped: {stats.first_errors[0]})" if stats.first_errors else ""
        print(f"trainhealth report: no record read from {', '.join(found)}{why}; nothing written", file=sys.stderr)
        return 1
    try:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(body)
    except OSError as exc:
        print(f"trainhealth report: cannot write {output}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"trainhealth report: {stats.records} records, {stats.skipped} corrupt lines skipped; "
          f"wrote {output} ({len(body.encode()) / 1e6:.2f} MB)", file=sys.stderr)
    for err in stats.first_errors:
        print(f"  skipped {err}", file=sys.stderr)
    return 0


RECORD_SUFFIXES = (".jsonl", ".jsonl.gz")


def record_files(command: str, paths: Sequence[str]) -> list[str] | None:
    """The files to read: each file as given, and a folder's .jsonl/.jsonl.gz files (sorted; not its
    subfolders). None, after saying why on stderr, for a path that is missing or a folder with none."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(RECORD_SUFFIXES)
                            and os.path.isfile(os.path.join(path, n)))
            if not inside:
                print(f"trainhealth {command}: no .jsonl or .jsonl.gz file in the folder {path}", file=sys.stderr)
                return None
            out += inside
        elif os.path.isfile(path):
            out.append(path)
        else:
            print(f"trainhealth {command}: no such file: {path}", file=sys.stderr)
            return None
    return out


def serve(settings: Settings, load_settings: Callable[[], Settings] | None = None,
          log_level: str = "info") -> int:
    """Run the sidecar; ``load_settings`` re-reads file, environment and flags on a reload."""
    import uvicorn

    from .assembly import build_sidecar
    from .http.connections import connection_cap, guarded_protocol, raise_fd_limit
    from .http.server import Server

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per webhook delivery
    from .dblock import DbLock

    lock = DbLock(settings.server.db) if settings.server.db != ":memory:" else None  # one sidecar per --db
    # What is imported by now (modules, classes, functions: ~60,000 objects) lives as long as the process: out
    # of the collector's sight, a full collection scans only the runs' state (in-process, 64 batches of 1000
    # records: the one full collection took 55 ms, 0.86 us a record; 16 ms frozen).
    gc.collect()
    gc.freeze()
    service, app = build_sidecar(settings, load_settings)
    host, port = settings.server.host, settings.server.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        print(f"trainhealth: cannot bind {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    sock.listen(2048)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    server = settings.server
    cap = connection_cap(server.max_connections, raise_fd_limit())
    http: Any = "h11"
    try:
        http = guarded_protocol(cap, server.header_timeout_seconds, server.body_timeout_seconds)
    except ImportError:  # uvicorn without its [standard] extra (no httptools): serve, without the guard
        print("trainhealth: WARNING: httptools is not installed (pip install 'uvicorn[standard]'): no header "
              "timeout and no connection cap", file=sys.stderr, flush=True)
    if server.token is not None and (server.token == PLACEHOLDER_TOKEN or len(server.token) < MIN_TOKEN_CHARS):
        what = "the placeholder from trainhealth.env.example" if server.token == PLACEHOLDER_TOKEN \
            else f"{len(server.token)} characters long"
        print(f"trainhealth: WARNING: the token is {what}: anyone can guess it. Use a long random one "
              "(openssl rand -hex 32).", file=sys.stderr, flush=True)
    print(f"trainhealth: listening on http://{shown}:{bound}", file=sys.stderr, flush=True)
    if not server.token and not is_loopback(host):
        print(f"trainhealth: WARNING: {host} is reachable from other machines and no token is set: anyone "
              "who can reach this port can send records, read runs and alerts, and silence or acknowledge "
              "alerts. Set --token or TRAINHEALTH_TOKEN (see docs/operations.md), or bind 127.0.0.1.",
              file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=log_level if log_level != "info" else "warning",
                            access_log=False, timeout_graceful_shutdown=5,
                            http=http,
                            timeout_keep_alive=server.keep_alive_seconds)  # type: ignore[arg-type]
    try:
        Server(config, service).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C: uvicorn shut down gracefully, then re-raised SIGINT
        pass
    finally:
        if lock is not None:
            lock.release()
    return 0


def read_token(path: str) -> str:
    """The token in a file (its first line, without the newline); ConfigError when there is none."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file: cannot read {path!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise ConfigError(f"--token-file: {path!r} holds no token (its first line is empty)")
    return token


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; any other address or name may be reachable from elsewhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
