"""The one subprocess wrapper: argv lists only, a timeout, logged, checked.

Every call to an external program (Nix, mostly) goes through :func:`run`, so that a
missing binary, a timeout and a non-zero exit all become the project's own errors with
the command line and the tail of stderr in the message.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tracehook.errors import CommandFailed, EnvironmentFault

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    input: str | None = None,
    cwd: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> Result:
    """Run ``argv`` and return its output; raise on a missing binary, timeout or failure.

    ``env`` replaces the environment; ``extra_env`` is laid over it (or over ours).
    """
    args = tuple(str(a) for a in argv)
    if not args:
        raise ValueError("run() needs a program")
    full_env = dict(os.environ if env is None else env)
    if extra_env:
        full_env.update(extra_env)
    cmdline = shlex.join(args)
    log.debug("$ %s", cmdline)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            env=full_env,
            input=input,
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="surrogateescape",
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise EnvironmentFault(f"{args[0]}: not found (is it installed and on PATH?)") from exc
    except PermissionError as exc:
        raise EnvironmentFault(f"{args[0]}: not executable: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"timed out after {timeout:g} s: {cmdline}") from exc
    elapsed = time.monotonic() - start
    result = Result(args, proc.returncode, proc.stdout, proc.stderr, elapsed)
    if check and proc.returncode != 0:
        tail = proc.stderr.strip()[-_STDERR_TAIL:]
        raise CommandFailed(f"exit {proc.returncode}: {cmdline}\n{tail}")
    return result


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """Start a long-running program (a gate, a publisher); the caller stops it."""
    args = tuple(str(a) for a in argv)
    full_env = dict(os.environ if env is None else env)
    if extra_env:
        full_env.update(extra_env)
    log.debug("$ %s &", shlex.join(args))
    try:
        return subprocess.Popen(
            args, env=full_env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
    except FileNotFoundError as exc:
        raise EnvironmentFault(f"{args[0]}: not found (is it installed and on PATH?)") from exc
