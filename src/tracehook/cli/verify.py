"""``tracehook verify TARGET... --policy FILE [--store ROOT] [--traces URL ...] [--json]``.

Re-does dependency resolution for each TARGET and accepts it only when a chain of trusted
build traces links it down to fixed-output sources (docs/POLICY.md). A TARGET is a .drv path
(every output), ``DRV^out,dev`` (those outputs), or an output path: that output of the
derivation that produced it, found through the store's realisations and derivers (the
original .drv, also for a content-addressed path substituted from a cache; the store must
hold it). ``--store ROOT`` reads a chroot-style store (``ROOT/nix/store``). ``--traces``
replaces the policy's ``traces`` list. When the policy
trusts a cache key (``narinfo-key``), ``--narinfo-from URL`` names the binary caches whose
narinfos and realisations are checked against it; ``--explain-trust`` summarises each
closure: steps verified by traces, accepted on a cache signature, covered, refused.

The same command run again answers at once when nothing it read has changed (every file's
bytes, the files it found absent, the side of every ``not-after``): see
:mod:`tracehook.verify.replay`; ``-v`` says so.

Exit: 0 every target verified, 1 not verified, 2 usage or configuration error, 3 the Nix
store or a trace store could not be read (and that may be why something did not verify).
"""

from __future__ import annotations

import argparse
import os
import sys

TYPE_CHECKING = False  # not typing's: a replayed run imports as little as it can
if TYPE_CHECKING:  # the rest is imported only when the run is not replayed
    import datetime as dt

    from tracehook.stores.factcache import FactCache
    from tracehook.stores.readlog import ReadLog
    from tracehook.verify.policy import Policy


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "verify",
        help="verify derivations or store paths against the trust policy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("targets", nargs="+", metavar="TARGET", help=".drv path, DRV^outs, or "
                   "output path")
    p.add_argument("--policy", required=True, metavar="FILE", help="trust policy (TOML)")
    p.add_argument("--store", metavar="ROOT", help="chroot-style store root (default: /)")
    p.add_argument("--traces", action="append", metavar="URL",
                   help="trace store to read (repeatable; replaces the policy's list)")
    p.add_argument("--narinfo-from", action="append", metavar="URL",
                   help="binary cache (file:///DIR, http(s)://) to read narinfos and "
                        "realisations from, for the policy's narinfo-key (repeatable)")
    p.add_argument("--explain-trust", action="store_true",
                   help="summarise how each closure is trusted (traces, cache signatures)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--at", metavar="TIME", help="reference time for key expiry (ISO 8601, "
                   "with a time zone; default: now)")
    # The defaults are Limits' (tracehook.verify.limits), written out: importing it here
    # would cost every run, replayed or not, the dataclasses module.
    p.add_argument("--max-depth", type=int, metavar="N",
                   help="longest input chain below a target (default: 2000)")
    p.add_argument("--max-resolutions", type=int, metavar="N",
                   help="cap on candidate resolutions of one step (default: 256)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="concurrent fetches and signature checks (threads; default: 8)")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="check traces in N worker processes instead (0: never; default: "
                   "one per core, for closures of 1000 or more derivations, or of 500 or "
                   "more once 32 checks wait at once)")
    p.add_argument("--fail-on-tamper", action="store_true",
                   help="refuse a target when tamper evidence (a forged signature, a forged "
                   "cache signature, contradicting claims) is seen anywhere in its closure, "
                   "even if it verifies another way")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="persistent verification cache (facts that never change: parsed "
                   ".drv files, signature checks, resolutions; and answers replayed while "
                   "every file they were decided from is unchanged; default "
                   "$TRACEHOOK_CACHE_DIR, else $XDG_CACHE_HOME/tracehook; '' for none)")
    p.set_defaults(func=main, configures_logging=True)


def _cache_dir(given: str | None) -> str | None:
    """The persistent cache's directory, or None for none."""
    where = given if given is not None else os.environ.get("TRACEHOOK_CACHE_DIR")
    if where is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return os.path.join(base, "tracehook")
    return where or None


def _facts(directory: str | None) -> FactCache | None:
    """The persistent cache to use, or None; a cache that cannot be opened is a warning,
    never a reason not to verify."""
    import sqlite3
    from pathlib import Path

    from tracehook.stores.factcache import FactCache

    if directory is None:
        return None
    try:
        return FactCache(Path(directory), background=True)
    except (OSError, sqlite3.Error) as exc:
        print(f"tracehook: warning: verification cache {directory} unusable ({exc}); "
              "verifying without it", file=sys.stderr)
        return None


def _reference_time(at: str) -> dt.datetime:
    import datetime as dt

    from tracehook.errors import ConfigError

    try:
        when = dt.datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--at {at!r} is not an ISO 8601 date-time") from None
    if when.tzinfo is None:
        raise ConfigError(f"--at {at!r} needs a time zone, e.g. {at}Z")
    return when


def main(args: argparse.Namespace) -> int:
    import time

    at = _reference_time(args.at) if args.at is not None else None
    now = at.timestamp() if at is not None else time.time()
    cache_dir = _cache_dir(args.cache_dir)
    key = None
    if cache_dir is not None:
        from tracehook.verify import replay

        argv = {k: v for k, v in vars(args).items()
                if k not in ("func", "verbose", "configures_logging")}
        key = replay.run_key(argv, os.getcwd(), os.environ)
        replayed = replay.replay(cache_dir, key, now)
        if replayed is not None:
            code, output = replayed
            if args.verbose:
                print("tracehook: INFO: replayed the answer of an earlier run: everything it "
                      "read is unchanged", file=sys.stderr)
            sys.stdout.write(output)
            return code
    import datetime as dt

    from tracehook.cli import _configure_logging
    from tracehook.stores.readlog import recording

    _configure_logging(args.verbose)
    when = at or dt.datetime.fromtimestamp(now, dt.timezone.utc)
    with recording() as seen:
        code, output, policy, clean = _verify(args, when, cache_dir)
    sys.stdout.write(output)
    if key is not None and cache_dir is not None and clean and code in (0, 1):
        _record(cache_dir, key, seen, policy, when, at is None, code, output)
    return code


def _record(cache_dir: str, key: str, seen: ReadLog, policy: Policy, now: dt.datetime,
            float_time: bool, code: int, output: str) -> None:
    """Keep the answer for a replay (:mod:`tracehook.verify.replay`), when every input
    was a local file seen here."""
    from tracehook.verify import replay

    if seen.opaque or policy.evidence:
        return
    try:
        replay.save(cache_dir, key, files=seen.files, stats=seen.stats, now=now.timestamp(),
                    reference=now.isoformat(), float_time=float_time,
                    bounds=replay.not_after_bounds(policy),
                    exit_code=code, output=output)
    except OSError as exc:
        print(f"tracehook: warning: cannot record the answer in {cache_dir} ({exc})",
              file=sys.stderr)


def _verify(args: argparse.Namespace, now: dt.datetime, cache_dir: str | None
            ) -> tuple[int, str, Policy, bool]:
    """(exit code, output, policy, whether the run is fit to replay)."""
    import gc
    import json
    import logging

    from tracehook.errors import EXIT_ENVIRONMENT, EXIT_OK, EXIT_REFUSED, ConfigError
    from tracehook.stores.binarycache import open_upstream
    from tracehook.stores.nixstore import StoreReader
    from tracehook.stores.readlog import note_opaque, note_read
    from tracehook.stores.tracestore import open_store
    from tracehook.verify.limits import Limits
    from tracehook.verify.policy import load_policy
    from tracehook.verify.report import render_human
    from tracehook.verify.resolver import Resolver
    from tracehook.verify.targets import parse_targets

    class Warned(logging.Handler):
        """Notes that a warning was logged: a replay would not repeat it."""

        def emit(self, record: logging.LogRecord) -> None:
            note_opaque("a warning")

    warned = Warned(logging.WARNING)
    logging.getLogger().addHandler(warned)
    for flag in ("max_depth", "max_resolutions", "jobs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    policy = load_policy(args.policy, seen=note_read)
    urls = tuple(args.traces) if args.traces else policy.traces
    if not urls and policy.traces_can_verify:
        raise ConfigError(f"no trace stores: add traces = [...] to {args.policy} or pass "
                          "--traces URL")
    if policy.narinfo_keys and not args.narinfo_from:
        raise ConfigError(f"{args.policy} trusts cache signatures (narinfo-key): pass "
                          "--narinfo-from URL for the binary cache to check them in")
    stores = [open_store(u) for u in urls]
    if args.narinfo_from and not policy.narinfo_keys:
        print(f"tracehook: warning: --narinfo-from is ignored: {args.policy} trusts no cache "
              "key (narinfo-key)", file=sys.stderr)
        note_opaque("a warning")
    caches = [open_upstream(u) for u in args.narinfo_from or ()]
    facts = _facts(cache_dir)
    if facts is None:
        note_opaque("no verification cache")
    reader = StoreReader(args.store, facts=facts)
    targets = parse_targets(args.targets, reader, args.store)
    if args.processes is not None and args.processes < 0:
        raise ConfigError(f"--processes {args.processes}: give 0 or more")
    d = Limits()
    limits = Limits(args.max_depth or d.max_depth, args.max_resolutions or d.max_resolutions,
                    args.jobs or d.workers, args.processes)
    resolver = Resolver(policy, stores, reader.read_derivation, now, limits, caches, facts,
                        args.fail_on_tamper)
    try:
        reports = resolver.verify(targets)
    finally:
        if facts is not None:
            facts.close()
        logging.getLogger().removeHandler(warned)
    # What the run made lives until the process exits: kept out of the cyclic collector's
    # reach, so that printing the report does not set off a full collection over it.
    gc.freeze()
    verified = all(r.verified for r in reports)
    if args.json:
        obj = reports[0].to_json() if len(reports) == 1 else {
            "verified": verified, "targets": [r.to_json() for r in reports]}
        output = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    else:
        output = "\n".join(render_human(r, args.explain_trust) for r in reports) + "\n"
    clean = not resolver.faults
    if verified:
        return EXIT_OK, output, policy, clean
    return (EXIT_ENVIRONMENT if resolver.faults else EXIT_REFUSED), output, policy, clean

