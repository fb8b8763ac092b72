"""``tracehook policy check FILE``: load a trust policy as the gate and the verifier do.

Prints one line: the file, its keys (with how many are revoked or expired now), its trace
stores and the requirement, e.g. ``policy.toml: valid: 3 keys, 2 trace stores; requires
all of (mine, any of (rebuilderX, rebuilderY))``. Exit 0 when the policy loads, 2 with the
loader's one-line error when it does not (docs/POLICY.md lists them).

The NixOS module runs it on the rendered policy at build time, before the gate starts
(``ExecStartPre``) and before a reload signals the gate (``ExecReload``): a broken policy
fails the build or the reload, and a running gate keeps the policy it has.
"""

from __future__ import annotations

import argparse
import datetime as dt

from tracehook.errors import EXIT_OK
from tracehook.verify.policy import Policy, load_policy


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "policy",
        help="check a trust policy file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="load a policy file; print a one-line summary (exit 0) or the error (exit 2)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("file", metavar="FILE", help="the policy (TOML, docs/POLICY.md)")
    check.set_defaults(func=main_check)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary(policy: Policy, now: dt.datetime) -> str:
    """``valid: 3 keys (1 revoked), 2 trace stores; requires ...`` for one policy."""
    statuses = [k.status(now) for k in policy.keys + policy.narinfo_keys]
    flagged = [
        f"{statuses.count(s)} {s}" for s in ("revoked", "expired") if statuses.count(s)
    ]
    keys = _count(len(policy.keys), "key")
    if policy.narinfo_keys:
        keys += f", {_count(len(policy.narinfo_keys), 'cache key')}"
    if flagged:
        keys += f" ({', '.join(flagged)})"
    stores = _count(len(policy.traces), "trace store")
    return f"valid: {keys}, {stores}; requires {policy.describe()}"


def main_check(args: argparse.Namespace) -> int:
    policy = load_policy(args.file)
    print(f"{args.file}: {summary(policy, dt.datetime.now(dt.timezone.utc))}")
    return EXIT_OK
