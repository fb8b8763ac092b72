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

from tracehook.errors import EXIT_ENVIRONMENT, EXIT_OK, ConfigError, EnvironmentFault
from tracehook.signer import config
from tracehook.signer.agent import SigningAgent
from tracehook.signer.agent_client import DEFAULT_SOCKET
from tracehook.signer.publish import Publisher
from tracehook.stores.eventlog import EventLog
from tracehook.stores.spool import Spool
from tracehook.stores.tracestore import open_store


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
                   "(default $TRACEHOOK_AGENT_SOCKET or /run/tracehook/agent.sock)")
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
    items, bad = spool.scan()
    for it in items:
        e = it.entry
        if args.json:
            print(json.dumps({"file": str(it.path), "kind": e.kind, "key": e.key, "kid": e.kid,
                              "drv": e.drv_path, "outputs": e.outputs, "created": e.created}))
        else:
            outs = " ".join(o["path"] for o in e.outputs.values())
            print(f"{e.kind} {e.key} {e.kid} {e.drv_path} -> {outs}")
    for path, why in bad:
        print(f"unreadable: {path}: {why}", file=sys.stderr)
    if not args.json:
        print(f"{len(items)} pending, {len(spool.sent())} sent, {len(bad)} unreadable "
              f"({spool.root})", file=sys.stderr)
    return EXIT_OK


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
    events = EventLog(cfg.log_file, journal=args.daemon)  # a daemon's stderr is the journal
    publisher = Publisher(spool, stores, events, max_backoff=args.max_backoff)
    if args.daemon:
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        agent = None
        if not args.no_agent:
            default = os.environ.get("TRACEHOOK_AGENT_SOCKET") or DEFAULT_SOCKET
            agent = SigningAgent(args.agent_socket or Path(default))
            try:
                agent.start()
            except EnvironmentFault as exc:  # the hook then signs in its own process
                events.emit("agent", "failed", f"signing agent not started: {exc.diagnostics()}"
                            " (the post-build hook signs in process, slower)",
                            reason=exc.diagnostics(), socket=str(agent.path))
                agent = None
            else:
                events.emit("agent", "ok", f"signing agent listening on {agent.path}",
                            socket=str(agent.path))
        try:
            publisher.run(args.interval, stop)
        finally:
            if agent is not None:
                agent.stop()
        return EXIT_OK
    report = publisher.drain()
    print(f"published {len(report.delivered)}, kept {len(report.kept)} pending, "
          f"{len(report.bad)} unreadable", file=sys.stderr)
    return EXIT_OK if report.complete else EXIT_ENVIRONMENT
