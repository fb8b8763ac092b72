"""``tracehook sign DRV``: sign a build trace by hand, for a derivation already built.

Computes the step's key and outputs exactly as the post-build hook does (from the store's
files and database; ``--store ROOT`` for a chroot store, ``--out-paths`` when the outputs
are known), signs with ``--key`` (or the configured key; the trace names the Nix version
of the ``nix`` on PATH, or ``nix-version`` of the configuration) and prints the JWS, or appends it
to the trace stores given with ``--to`` (repeatable) directly, bypassing the spool.
Exit 0 signed (or skipped with the reason on stderr), 2 configuration, 3 store unreadable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tracehook.errors import EXIT_OK, ConfigError
from tracehook.signer import config, examine, nixversion
from tracehook.stores.tracestore import open_store
from tracehook.trace import crypto


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "sign", help="sign a build trace for a built derivation",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("drv", metavar="DRV", help="the .drv path (/nix/store/...)")
    p.add_argument("--store", metavar="ROOT", help="chroot store root (default: /nix/store)")
    p.add_argument("--out-paths", nargs="+", default=[], metavar="PATH",
                   help="the output paths (default: from the store's records)")
    p.add_argument("--key", type=Path, metavar="F", help="secret key file")
    p.add_argument("--to", action="append", metavar="URL", help="append to this trace store")
    p.add_argument("--config", type=Path, help="signer configuration")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, require_file=args.config is not None)
    key_file = args.key or cfg.secret_key_file
    if key_file is None:
        raise ConfigError("no signing key: pass --key F or set secret-key-file")
    sk = crypto.read_secret_key_file(key_file)
    root = args.store if args.store is not None else cfg.store_root
    store = examine.LocalStore(root)
    try:
        step = examine.examine(store, args.drv, args.out_paths)
    finally:
        store.close()
    if isinstance(step, examine.Skipped):
        print(f"tracehook: not signing {args.drv}: {step.reason}", file=sys.stderr)
        return EXIT_OK
    flavor, version = nixversion.detect(cfg.nix_flavor, cfg.nix_version, None, os.environ,
                                        nixversion.VersionCache())
    token = examine.sign(step, sk, examine.builder_info(flavor, version))
    key = step.resolution.key
    if not args.to:
        print(token)
    for url in args.to or ():
        open_store(url, create=True).append(key.key, [token])
        print(f"tracehook: appended {key.kind} trace {key.key} to {url}", file=sys.stderr)
    print(f"tracehook: {key.kind} key {key.key} (resolved {key.rdrv_path})", file=sys.stderr)
    return EXIT_OK
