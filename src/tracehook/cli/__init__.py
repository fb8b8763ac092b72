"""The ``tracehook`` command: turns flags into objects, calls the library, maps errors.

Each subcommand lives in its own module of this package exposing ``register(subparsers)``; the
parser's ``func`` default is the subcommand's ``main(args) -> int``. This module is the one
place that turns a :class:`~tracehook.errors.TracehookError` into a message and an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from tracehook import __version__
from tracehook.errors import EXIT_USAGE, TracehookError

Handler = Callable[[argparse.Namespace], int]

EPILOG = """\
exit codes: 0 ok, 1 refused or verification failed, 2 usage or configuration error,
3 environment error (a store, trace store or network could not be read)
"""


# One module a subcommand; each has ``register(subparsers)``. Keep this list sorted.
_SUBCOMMANDS = (
    "tracehook.cli.demo",
    "tracehook.cli.evidence",
    "tracehook.cli.gate",
    "tracehook.cli.keygen",
    "tracehook.cli.log",
    "tracehook.cli.policy",
    "tracehook.cli.publish",
    "tracehook.cli.sign",
    "tracehook.cli.verify",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracehook",
        description="Signed, chained build traces for Nix, enforced inline.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tracehook {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeatable)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="tracehook: %(levelname)s: %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help/--version
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except TracehookError as exc:
        print(f"tracehook: error: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tracehook ... | head`: the reader left; that is not an error
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
