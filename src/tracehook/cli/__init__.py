"""The ``tracehook`` command: turns flags into objects, calls the library, maps errors.

Each subcommand lives in its own module of this package exposing ``register(subparsers)``; the
parser's ``func`` default is the subcommand's ``main(args) -> int``. This module is the one
place that turns a :class:`~tracehook.errors.TracehookError` into a message and an exit code.
"""

from __future__ import annotations

import importlib
import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing (and re) costs ``--version`` 10 ms
if TYPE_CHECKING:  # only for annotations: the start-up of every command pays for imports
    import argparse
    from collections.abc import Callable, Sequence

EPILOG = """\
exit codes: 0 ok, 1 refused or verification failed, 2 usage or configuration error,
3 environment error (a store, trace store or network could not be read)
"""


# One module a subcommand (``register(subparsers)``), imported only when that subcommand
# runs: ``tracehook --version`` and ``--help`` import none. Keep this table sorted.
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tracehook.cli.demo",
             "run the end-to-end demo with real Nix (build, sign, gate, refuse)"),
    "evidence": ("tracehook.cli.evidence",
                 "check hardware evidence (AMD SEV-SNP attestation reports)"),
    "gate": ("tracehook.cli.gate", "serve a verifying binary-cache front for Nix's substituters"),
    "keygen": ("tracehook.cli.keygen", "generate a signing key pair (Nix key file format)"),
    "log": ("tracehook.cli.log", "read the hook, publisher and gate logs"),
    "policy": ("tracehook.cli.policy", "check a trust policy file"),
    "publish": ("tracehook.cli.publish", "deliver spooled traces to the trace stores"),
    "sign": ("tracehook.cli.sign", "sign a build trace for a built derivation"),
    "spool": ("tracehook.cli.publish", "list traces waiting to be published"),
    "verify": ("tracehook.cli.verify",
               "verify derivations or store paths against the trust policy"),
}


def _version_action() -> type[argparse.Action]:
    import argparse

    class _Version(argparse.Action):
        """``--version``, the version looked up only when asked for."""

        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: object, option_string: str | None = None) -> None:
            from tracehook import __version__

            print(f"tracehook {__version__}")
            parser.exit()

    return _Version


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (the first argument that is not a global option)."""
    for arg in argv:
        if arg in ("-v", "-vv", "-vvv", "--verbose") or (arg.startswith("-v") and
                                                         set(arg[1:]) == {"v"}):
            continue
        return arg if arg in _SUBCOMMANDS else None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser, with the full arguments of the subcommand ``argv`` names (imported now)
    and one line of help for each of the others."""
    import argparse  # here: ``tracehook --version`` alone need not pay for it (nor for re)

    parser = argparse.ArgumentParser(
        prog="tracehook",
        description="Signed, chained build traces for Nix, enforced inline.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_version_action(), nargs=0,
                        help="show the version and exit")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeatable)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    command = _command(argv)
    if command is not None:
        importlib.import_module(_SUBCOMMANDS[command][0]).register(sub)
    for name, (_, help_text) in _SUBCOMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text)
    return parser


def _configure_logging(verbosity: int) -> None:
    import logging  # here: ``tracehook --version`` need not pay for it

    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="tracehook: %(levelname)s: %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list == ["--version"]:  # without argparse (and re): what scripts ask most
        from tracehook import __version__

        print(f"tracehook {__version__}")
        return 0
    parser = build_parser(args_list)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help/--version
        return int(exc.code) if isinstance(exc.code, int) else 2
    if not getattr(args, "configures_logging", False):  # else the subcommand does, if needed
        _configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2  # usage (tracehook.errors.EXIT_USAGE)
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tracehook ... | head`: the reader left; that is not an error
        import contextlib

        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except Exception as exc:
        # Imported only now: a command that succeeds (a replayed verify) need not pay for
        # the error classes' dataclasses and typing.
        from tracehook.errors import TracehookError

        if not isinstance(exc, TracehookError):
            raise
        print(f"tracehook: error: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code

def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
