"""``tracehook publish`` and ``tracehook spool``: deliver and inspect the signer's spool.

``tracehook publish`` delivers every pending trace to every store in ``publish-to`` (or
``--to``) once and exits: 0 when the spool is empty afterwards, 3 when a store failed and
traces stay pending (run it again; nothing is lost). ``--daemon`` keeps draining (poll
``--interval``, per-store exponential backoff up to ``--max-backoff``) until SIGTERM/SIGINT:
suitable as a systemd service. ``--dry-run`` lists what would be sent where, and sends
nothing. The daemon also serves the post-build hook's signing agent on a Unix socket
(``--agent-socket``; ``--no-agent`` to turn it off), so that the hook, which Nix waits for
after every build, does not start a cold signer each time. ``tracehook spool`` lists
pending entries (``--json`` for one JSON object a line).

Configuration: ``--config FILE``, else ``$TRACEHOOK_CONFIG``, else /etc/tracehook/sign.toml;
the daemon's signing agent signs with that same file (its ``secret-key-file``,
``store-root``, ``strict``, ``log-file``). At start the daemon checks what every build would
otherwise trip over: the secret key (readable, a Nix secret key), the log file (writable) and
the agent's socket path (only a stale socket there is replaced). Each failure is one line and
exit 2. Without ``secret-key-file`` no agent is started (it never sees nix.conf's
``secret-key-files``; the hook then signs in its own process), and the daemon says so.
Delivered entries older than ``keep-sent`` (default 7 days) are deleted from the spool's
``sent/`` ledger.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from tracehook.errors import (
    EXIT_ENVIRONMENT,
    EXIT_OK,
    ConfigError,
    EnvironmentFault,
    TracehookError,
)
from tracehook.signer import config
from tracehook.signer.agent import SigningAgent
from tracehook.signer.publish import Publisher
from tracehook.stores.eventlog import EventLog
from tracehook.stores.spool import Spool
from tracehook.stores.tracestore import check_for_writing, open_store
from tracehook.trace import crypto


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="signer configuration (default $TRACEHOOK_CONFIG"
                   " or /etc/tracehook/sign.toml)")
    p.add_argument("--spool-dir", type=Path, help="override the configured spool directory")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "publish", help="deliver spooled traces to the trace stores",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--to", action="append", metavar="URL",
                   help="trace store (repeatable); replaces publish-to")
    p.add_argument("--daemon", action="store_true", help="keep draining until stopped")
    p.add_argument("--dry-run", action="store_true", help="list what would be sent, send nothing")
    p.add_argument("--interval", type=float, default=2.0, help="daemon poll interval, seconds")
    p.add_argument("--max-backoff", type=float, default=300.0,
                   help="longest wait before retrying a failed store, seconds")
    p.add_argument("--agent-socket", type=Path, metavar="PATH",
                   help="with --daemon: serve the post-build hook's signing agent here "
                   "(default $TRACEHOOK_AGENT_SOCKET, else agent-socket in the "
                   "configuration, else /run/tracehook/agent.sock)")
    p.add_argument("--no-agent", action="store_true",
                   help="with --daemon: do not serve the signing agent")
    p.set_defaults(func=main_publish)

    s = subparsers.add_parser(
        "spool", help="list traces waiting to be published",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(s)
    s.add_argument("--json", action="store_true", help="one JSON object per pending entry")
    s.set_defaults(func=main_spool)


def _load(args: argparse.Namespace) -> tuple[config.SignConfig, Spool]:
    cfg = config.load(args.config, require_file=args.config is not None
                           or config.config_path().exists())
    spool_dir = args.spool_dir or cfg.spool_dir
    return cfg, Spool(spool_dir)


def main_spool(args: argparse.Namespace) -> int:
    _, spool = _load(args)
    scan = spool.scan()
    for it in scan.items:
        e = it.entry
        if args.json:
            print(json.dumps({"file": str(it.path), "kind": e.kind, "key": e.key, "kid": e.kid,
                              "drv": e.drv_path, "outputs": e.outputs, "created": e.created}))
        else:
            outs = " ".join(o["path"] for o in e.outputs.values())
            print(f"{e.kind} {e.key} {e.kid} {e.drv_path} -> {outs}")
    problems = [*scan.bad, *scan.locked]
    for path, why in problems:
        print(f"unreadable: {path}: {why}", file=sys.stderr if args.json else sys.stdout)
    if not args.json:
        print(f"{len(scan.items)} pending, {len(spool.sent())} sent, {len(problems)} "
              f"unreadable ({spool.root})")
    return EXIT_OK


def check_daemon_start(cfg: config.SignConfig) -> None:
    """What every build would trip over, found at start: ConfigError (exit 2), one line."""
    where = cfg.source or "the signer configuration"
    if cfg.secret_key_file is not None:
        try:
            crypto.read_secret_key_file(cfg.secret_key_file)
        except TracehookError as exc:
            raise ConfigError(f"secret-key-file in {where}: {exc.diagnostics()}") from None
    if cfg.log_file is not None:
        try:
            cfg.log_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(cfg.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.close(fd)
        except OSError as exc:
            raise ConfigError(
                f"log file {cfg.log_file} (log-file in {where}) is not writable by uid "
                f"{os.getuid()}: {exc.strerror or exc}"
            ) from None


def _start_agent(cfg: config.SignConfig, path: Path, events: EventLog) -> SigningAgent | None:
    agent = SigningAgent(path, cfg)
    try:
        agent.start()  # ConfigError (something else at the path) ends the daemon: exit 2
    except EnvironmentFault as exc:  # the hook then signs in its own process
        events.emit("agent", "failed", f"signing agent not started: {exc.diagnostics()}"
                    " (the post-build hook signs in process, slower)",
                    reason=exc.diagnostics(), socket=str(agent.path))
        return None
    events.emit("agent", "ok", f"signing agent listening on {agent.path}",
                socket=str(agent.path))
    return agent


def main_publish(args: argparse.Namespace) -> int:
    cfg, spool = _load(args)
    urls = tuple(args.to) if args.to else cfg.publish_to
    if not urls:
        raise ConfigError("no trace store to publish to: set publish-to in the configuration "
                          "or pass --to URL")
    stores = [open_store(u, create=True) for u in urls]
    if args.dry_run:
        items = spool.pending()
        for it in items:
            for url in urls:
                print(f"would publish {it.entry.kind} {it.entry.key} ({it.entry.drv_path}) "
                      f"to {url}")
        print(f"{len(items)} pending trace(s), {len(urls)} store(s); nothing sent",
              file=sys.stderr)
        return EXIT_OK
    socket_path = args.agent_socket or cfg.agent_socket
    serve_agent = args.daemon and not args.no_agent and socket_path is not None
    if args.daemon:
        check_daemon_start(cfg)
    events = EventLog(cfg.log_file, journal=args.daemon)  # a daemon's stderr is the journal
    for store in stores:  # refuses a store that ignores conditional PUTs (exit 2)
        note = check_for_writing(store)
        if note is not None:
            events.emit("publish", "unchecked", note, reason=note, store=store.url)
    if serve_agent and cfg.secret_key_file is None:
        why = (f"no secret-key-file in {cfg.source or 'the signer configuration'}: the agent "
               "signs with it and never sees nix.conf's secret-key-files")
        events.emit("agent", "failed", f"signing agent not started: {why} (the post-build "
                    "hook signs in process, slower)", reason=why, socket=str(socket_path))
        serve_agent = False
    publisher = Publisher(spool, stores, events, max_backoff=args.max_backoff,
                          keep_sent=cfg.keep_sent)
    if not args.daemon:
        report = publisher.drain()
        print(f"published {len(report.delivered)}, kept {len(report.kept)} pending, "
              f"{len(report.bad)} moved to bad/", file=sys.stderr)
        return EXIT_OK if report.complete else EXIT_ENVIRONMENT
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = _start_agent(cfg, socket_path, events) if serve_agent and socket_path else None
    try:
        publisher.run(args.interval, stop)
    finally:
        if agent is not None:
            agent.stop()
    return EXIT_OK
