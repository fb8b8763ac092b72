"""``tracehook gate``: the pre-substitution gate, a loopback binary cache in front of caches.

List it as the only substituter in nix.conf and trust only its key::

    substituters = http://127.0.0.1:37515
    trusted-public-keys = gate-1:<public key of --signing-key>

It answers a realisation or a narinfo only when the build step's chain of signed traces
verifies under the trust policy, and 404 otherwise (Nix then builds the step locally, or
fails with --max-jobs 0); every refusal is logged with the step and the reason
(``tracehook log --refused``). Nix never prints a substituter's reason for a 404 (any other
status makes it abandon the whole build), so the gate's log is where to look. A binary cache
or trace store that cannot be read answers 502, never "yes".

The policy file is watched: a change is in force within --policy-interval seconds (at once
on SIGHUP), logged as a ``policy-reload`` event; while the file does not parse, every
answer is 503 naming the error, and nothing is allowed or cached.

Without --signing-key the gate passes the upstreams' own narinfo signatures through and
signs nothing: Nix then accepts an input-addressed path only if it trusts the key of the
cache that signed it (trusted-public-keys); the gate warns at start.

Exit codes: 2 for a configuration error at start (bad policy, key, flag, or a port in use);
3 when the store (--store) cannot be listed; 0 after SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from tracehook.errors import EXIT_OK, ConfigError, TracehookError
from tracehook.gate.config import GateConfig, build_server, parse_listen, save_warm_start
from tracehook.gate.front import bound_port
from tracehook.gate.memo import CacheConfig
from tracehook.stores.eventlog import EventLog
from tracehook.verify.walk import service_collections

UNSIGNED_WARNING = (
    "no --signing-key: answers carry the upstreams' own narinfo signatures and realisations "
    "are unsigned; Nix refuses an input-addressed path unless it trusts the key of the cache "
    "that signed it (trusted-public-keys), whatever the gate allowed")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "gate",
        help="serve a verifying binary-cache front for Nix's substituters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--policy", required=env("TRACEHOOK_GATE_POLICY") is None,
                   default=env("TRACEHOOK_GATE_POLICY"), metavar="FILE",
                   help="trust policy (TOML); env TRACEHOOK_GATE_POLICY")
    p.add_argument("--upstream", action="append", default=[], metavar="URL",
                   help="binary cache to front: file:///DIR, http(s)://... or "
                        "s3://BUCKET?endpoint=HOST:PORT&region=R (credentials from the "
                        "AWS environment or profile=P; anonymous without) (repeatable, "
                        "tried in order)")
    p.add_argument("--listen", default=env("TRACEHOOK_GATE_LISTEN", "127.0.0.1:37515"),
                   metavar="HOST:PORT", help="where to serve (default %(default)s)")
    p.add_argument("--signing-key", default=env("TRACEHOOK_GATE_SIGNING_KEY"), metavar="F",
                   help="secret key file: sign answered narinfos and realisations with it; "
                        "without it the upstreams' signatures pass through and Nix rejects "
                        "input-addressed paths whose cache key it does not trust (a warning "
                        "at start); env TRACEHOOK_GATE_SIGNING_KEY")
    p.add_argument("--store", default=None, metavar="ROOT",
                   help="the consumer's store is chroot-style under ROOT (nix --store ROOT)")
    p.add_argument("--log-file", default=env("TRACEHOOK_GATE_LOG"), metavar="F",
                   help="append one JSON line per event here (env TRACEHOOK_GATE_LOG)")
    p.add_argument("--priority", type=int, default=30, help="nix-cache-info Priority")
    p.add_argument("--cache-ttl", type=float, default=CacheConfig.ttl, metavar="S",
                   help="seconds a decision is reused at most (default %(default)g); a "
                        "decision is also made again when the policy or a file trace store "
                        "changes, and at least every 60 s (key expiry, HTTP trace stores); a "
                        "refusal because an upstream lacks the path is never reused")
    p.add_argument("--cache-size", type=int, default=50_000, metavar="N",
                   help="decisions kept (default %(default)s)")
    p.add_argument("--upstream-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for a binary cache or trace store to answer each "
                        "read (a whole answer: 3 times that; default %(default)s)")
    p.add_argument("--cache-dir", default=env("TRACEHOOK_CACHE_DIR"), metavar="DIR",
                   help="persistent verification cache (facts that never change: parsed "
                        ".drv files, signature checks, resolutions; and the allowed answers "
                        "of the last run, replayed at start while every file they were "
                        "decided from is unchanged); env TRACEHOOK_CACHE_DIR")
    p.add_argument("--policy-interval", type=float, default=2.0, metavar="S",
                   help="seconds between two looks at the policy file for a change "
                        "(default %(default)g; SIGHUP looks at once)")
    p.add_argument("--verify-deadline", type=float, default=30.0, metavar="S",
                   help="seconds one verification may take; then 502 (default %(default)s)")
    p.add_argument("--fail-on-tamper", action="store_true",
                   help="refuse a path when tamper evidence is seen in its chain, even when "
                        "it verifies another way (always logged as 'tampered')")
    p.add_argument("--nar-urls", choices=("direct", "gate"), default="direct",
                   help="direct (default): a file:// upstream's narinfos name the NAR files "
                        "themselves (file:///DIR/nar/...), so Nix reads them without the "
                        "gate (Nix must be able to read DIR); gate: every NAR is served by "
                        "the gate. Either way Nix checks each NAR against the NarHash the "
                        "gate signed. NARs of HTTP and S3 upstreams always go through the "
                        "gate")
    p.add_argument("--index-interval", type=float, default=1.0, metavar="S",
                   help="seconds between background looks at the store directory for new "
                        ".drv files to index, and on Linux at once when one is written "
                        "(default %(default)g; 0: only when a request names one the index "
                        "does not know)")
    p.add_argument("--verify-ahead", type=float, default=600.0, metavar="S",
                   help="decide the closures of .drv files written at most S seconds before "
                        "the index reads them (what nix-instantiate or nixos-rebuild just "
                        "wrote) before Nix asks for them (default %(default)g; 0: only what "
                        "requests ask for)")
    p.add_argument("--generation-max-age", type=float, default=60.0, metavar="S",
                   help="seconds a generation of decisions lasts at most: HTTP and S3 trace "
                        "stores are read again after it (default %(default)g; with "
                        "--cache-dir the verified steps pass to the next generation when "
                        "every file they were decided from is unchanged)")
    p.add_argument("--no-handover", action="store_true",
                   help="each generation decides afresh: the verified steps and answers of "
                        "the last one are not taken over even when nothing they were "
                        "decided from changed")
    p.add_argument("--quiet", action="store_true", help="no human lines on stderr")


def config_from_args(args: argparse.Namespace) -> GateConfig:
    host, port = parse_listen(args.listen)
    for flag in ("policy_interval", "cache_ttl", "upstream_timeout", "verify_deadline",
                 "index_interval", "generation_max_age", "verify_ahead"):
        value = getattr(args, flag)
        zero = flag in ("cache_ttl", "index_interval", "verify_ahead")  # 0: off
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise ConfigError(f"--{flag.replace('_', '-')} {value:g}: give a number of "
                              f"seconds {'0 or more' if zero else 'above 0'}")
    return GateConfig(
        policy=Path(args.policy),
        upstreams=tuple(args.upstream),
        host=host,
        port=port,
        signing_key=Path(args.signing_key) if args.signing_key else None,
        store_root=args.store,
        log_file=Path(args.log_file) if args.log_file else None,
        priority=args.priority,
        upstream_timeout=args.upstream_timeout,
        cache=CacheConfig(max_entries=args.cache_size, ttl=args.cache_ttl),
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        verify_deadline=args.verify_deadline,
        fail_on_tamper=args.fail_on_tamper,
        direct_nars=args.nar_urls == "direct",
        policy_interval=args.policy_interval,
        index_interval=args.index_interval,
        generation_max_age=args.generation_max_age,
        handover=not args.no_handover,
        verify_ahead=args.verify_ahead,
    )


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    service_collections()
    events = EventLog(cfg.log_file, prefix="tracehook-gate",
                      stderr=None if args.quiet else sys.stderr, journal=True)
    server = build_server(cfg, events)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            stop.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        if server.policies is not None:
            server.policies.reload()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    events.emit("gate-start", "ok",
                f"serving on http://{cfg.host}:{bound_port(server)} in front of "
                f"{', '.join(cfg.upstreams)}",
                listen=f"{cfg.host}:{bound_port(server)}", upstreams=list(cfg.upstreams),
                policy=str(cfg.policy), store=cfg.store_root)
    if cfg.signing_key is None:
        events.emit("gate-config", "warning", UNSIGNED_WARNING, reason=UNSIGNED_WARNING)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        save_warm_start(server, events)
        server.service.verifier.close()
    return EXIT_OK


def standalone(argv: Sequence[str] | None = None) -> int:
    """``tracehook-gate``: the same command as a console script (systemd units)."""
    from tracehook.cli import _configure_logging

    parser = argparse.ArgumentParser(prog="tracehook-gate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    _configure_logging(args.verbose)
    try:
        return main(args)
    except TracehookError as exc:
        print(f"tracehook-gate: error: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code


def run() -> None:
    sys.exit(standalone())
