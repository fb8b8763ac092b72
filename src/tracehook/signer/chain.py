"""Chained post-build hooks: the programs tracehook's hook runs after signing.

Nix takes exactly one ``post-build-hook``. ``chain-hooks`` in sign.toml lists executables
(a Cachix or attic pusher, an upload script) that tracehook's hook runs once it has signed,
in the order given, each with exactly the environment Nix gave the hook (``DRV_PATH``,
``OUT_PATHS``, ``NIX_CONFIG`` with its ``access-tokens``, ...), no arguments, stdin, stdout
and stderr inherited (Nix shows their lines as ``post-build-hook: ...``), and waits for each
as Nix would (there is no timeout: a hook that hangs holds the build loop, as it would
without tracehook).

A chained hook that cannot be started, exits non-zero or is killed is reported (one line on
stderr, and a ``chain`` event with outcome ``failed`` in the log file) and the next one
still runs. It never changes the hook's exit code: the signature stands, and strict mode
fails a build only when signing fails.

They run in the hook's own process, not in the signing agent, which must never see Nix's
environment. The hook's fast path imports almost nothing, so this module starts them with
``os.posix_spawn`` and ``os.waitpid`` instead of :mod:`tracehook.stores.proc` (importing
``subprocess`` and the project's wrapper would add about 5 ms to every build, with or
without chained hooks, and the wrapper captures output, which these programs must not have
captured). Reporting a failure may be slow: it loads the configuration to find the log.
"""

from __future__ import annotations

import os
import sys

# Types only: importing collections.abc costs the hook's fast path ~2.5 ms (mypy reads the
# name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

EVENT = "chain"


def run_all(hooks: Sequence[str], environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Run ``hooks`` in order; (hook, what went wrong) for each that failed."""
    failures: list[tuple[str, str]] = []
    for path in hooks:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.posix_spawn(path, [path], dict(environ))
        except OSError as exc:
            failures.append((path, f"cannot start it: {exc.strerror or exc}"))
            continue
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code > 0:
            failures.append((path, f"exit code {code}"))
        elif code < 0:
            failures.append((path, f"killed by signal {-code}"))
    return failures


def report(failures: Sequence[tuple[str, str]], environ: Mapping[str, str]) -> None:
    """One human line and one JSON log line per failed chained hook (slow path)."""
    from tracehook.errors import TracehookError
    from tracehook.signer import config
    from tracehook.stores.eventlog import EventLog

    try:
        log_file = config.load(None, environ).log_file
    except TracehookError:
        log_file = None  # the signing line already said what is wrong with the file
    events = EventLog(log_file)
    drv = environ.get("DRV_PATH", "")
    for hook, why in failures:
        events.emit(
            EVENT, "failed",
            f"chained hook {hook} failed for {drv or '(no DRV_PATH)'}: {why} (the signature "
            "stands; the build continues)",
            reason=why, hook=hook, drv=drv, outputs=environ.get("OUT_PATHS", "").split(),
        )
