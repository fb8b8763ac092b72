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

Exit: 0 every target verified, 1 not verified, 2 usage or configuration error, 3 the Nix
store or a trace store could not be read (and that may be why something did not verify).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sqlite3
import sys
from pathlib import Path

from tracehook.errors import EXIT_ENVIRONMENT, EXIT_OK, EXIT_REFUSED, ConfigError
from tracehook.stores.binarycache import open_upstream
from tracehook.stores.factcache import FactCache, default_dir
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.tracestore import open_store
from tracehook.verify.engine import Limits
from tracehook.verify.policy import load_policy
from tracehook.verify.report import render_human
from tracehook.verify.resolver import Resolver
from tracehook.verify.targets import parse_targets


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
    p.add_argument("--max-depth", type=int, default=Limits.max_depth, metavar="N")
    p.add_argument("--max-resolutions", type=int, default=Limits.max_resolutions,
                   metavar="N", help="cap on candidate resolutions of one step")
    p.add_argument("--jobs", type=int, default=Limits.workers, metavar="N",
                   help="concurrent fetches and signature checks (threads)")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="check traces in N worker processes instead (0: never; default: "
                   f"one per core, for closures of {Limits.process_from} or more "
                   "derivations)")
    p.add_argument("--fail-on-tamper", action="store_true",
                   help="refuse a target when tamper evidence (a forged signature, a forged "
                   "cache signature, contradicting claims) is seen anywhere in its closure, "
                   "even if it verifies another way")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="persistent verification cache (facts that never change: parsed "
                   ".drv files, signature checks, resolutions; default $TRACEHOOK_CACHE_DIR, "
                   "else $XDG_CACHE_HOME/tracehook; '' for none)")
    p.set_defaults(func=main)


def _facts(given: str | None) -> FactCache | None:
    """The persistent cache to use, or None; a cache that cannot be opened is a warning,
    never a reason not to verify."""
    where = given if given is not None else os.environ.get("TRACEHOOK_CACHE_DIR")
    directory = default_dir() if where is None else Path(where) if where else None
    if directory is None:
        return None
    try:
        return FactCache(directory)
    except (OSError, sqlite3.Error) as exc:
        print(f"tracehook: warning: verification cache {directory} unusable ({exc}); "
              "verifying without it", file=sys.stderr)
        return None


def _reference_time(at: str | None) -> dt.datetime:
    if at is None:
        return dt.datetime.now(dt.timezone.utc)
    try:
        when = dt.datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--at {at!r} is not an ISO 8601 date-time") from None
    if when.tzinfo is None:
        raise ConfigError(f"--at {at!r} needs a time zone, e.g. {at}Z")
    return when


def main(args: argparse.Namespace) -> int:
    now = _reference_time(args.at)
    for flag in ("max_depth", "max_resolutions", "jobs"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    policy = load_policy(args.policy)
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
    caches = [open_upstream(u) for u in args.narinfo_from or ()]
    facts = _facts(args.cache_dir)
    reader = StoreReader(args.store, facts=facts)
    targets = parse_targets(args.targets, reader, args.store)
    if args.processes is not None and args.processes < 0:
        raise ConfigError(f"--processes {args.processes}: give 0 or more")
    limits = Limits(args.max_depth, args.max_resolutions, args.jobs, args.processes)
    resolver = Resolver(policy, stores, reader.read_derivation, now, limits, caches, facts,
                        args.fail_on_tamper)
    try:
        reports = resolver.verify(targets)
    finally:
        if facts is not None:
            facts.close()
    # What the run made lives until the process exits: kept out of the cyclic collector's
    # reach, so that printing the report does not set off a full collection over it.
    gc.freeze()
    verified = all(r.verified for r in reports)
    if args.json:
        obj = reports[0].to_json() if len(reports) == 1 else {
            "verified": verified, "targets": [r.to_json() for r in reports]}
        print(json.dumps(obj, indent=2, sort_keys=False))
    else:
        print("\n".join(render_human(r, args.explain_trust) for r in reports))
    if verified:
        return EXIT_OK
    return EXIT_ENVIRONMENT if resolver.faults else EXIT_REFUSED
