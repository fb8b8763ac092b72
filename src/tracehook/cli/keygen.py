"""``tracehook keygen NAME --secret-key-file F --public-key-file P``.

Writes an Ed25519 key pair in Nix's key file format, interchangeable with
``nix-store --generate-binary-cache-key NAME F P`` and ``nix key generate-secret``: Nix
signs with the secret key (``secret-key-files``) and accepts the public key
(``trusted-public-keys``). The secret key file gets mode 0600; existing files are never
overwritten (exit 2).
"""

from __future__ import annotations

import argparse

from tracehook.errors import EXIT_OK, ConfigError
from tracehook.trace import crypto


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "keygen",
        help="generate a signing key pair (Nix key file format)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="key name, e.g. builder1.example.org-1")
    p.add_argument("--secret-key-file", required=True, metavar="F", help="secret key (0600)")
    p.add_argument("--public-key-file", required=True, metavar="P", help="public key")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        sk = crypto.generate_secret_key(args.name)
    except ValueError as exc:
        raise ConfigError(f"key name {args.name!r}: {exc}") from None
    crypto.write_key_files(sk, args.secret_key_file, args.public_key_file)
    print(f"{crypto.format_public_key(sk.public)}")
    return EXIT_OK
