"""``tracehook log``: read the hook, publisher and gate logs.

    tracehook log                         # every log under /var/log/tracehook
    tracehook log --refused --since 1h    # what was refused in the last hour, and why
    tracehook log /var/log/tracehook/gate.log --follow
    journalctl -o cat -u tracehook-gate | tracehook log -
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from tracehook.cli._logview import Filter, collapse, parse_since, records, render_human
from tracehook.errors import EXIT_OK, EnvironmentFault

DEFAULT_LOG_DIR = Path("/var/log/tracehook")
POLL_SECONDS = 0.5


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "log",
        help="read the hook, publisher and gate logs",
        description="Read tracehook's JSON event logs (files, or '-' for stdin, e.g. "
        "journalctl -o cat -u tracehook-gate | tracehook log -).",
    )
    p.add_argument(
        "files", nargs="*", metavar="FILE",
        help=f"log files, or '-' for stdin (default: every *.log in {DEFAULT_LOG_DIR})",
    )
    p.add_argument("--refused", action="store_true", help="only refusals and failures")
    p.add_argument("--since", metavar="TIME", help="ISO time, or a span ago: 15m, 2h, 1d")
    p.add_argument("--event", action="append", default=[], help="only this event (repeatable)")
    p.add_argument("--follow", "-f", action="store_true", help="keep reading as lines arrive")
    p.add_argument("--json", action="store_true", help="print the JSON lines, not the view")
    p.set_defaults(func=main)


def _default_files() -> list[str]:
    files = sorted(str(p) for p in DEFAULT_LOG_DIR.glob("*.log"))
    if not files:
        raise EnvironmentFault(
            f"no log files in {DEFAULT_LOG_DIR}; name one, or pipe the journal into "
            "'tracehook log -'"
        )
    return files


def _open(name: str) -> IO[str]:
    if name == "-":
        return sys.stdin
    try:
        return open(name, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise EnvironmentFault(f"cannot read log {name}: {exc.strerror}") from exc


def _follow(handles: list[IO[str]]) -> Iterator[str]:
    """Every line of every handle, then new lines as they are appended (until Ctrl-C)."""
    while True:
        got = False
        for h in handles:
            line = h.readline()
            while line:
                got = True
                yield line
                line = h.readline()
        if not got:
            time.sleep(POLL_SECONDS)


def _all_lines(handles: list[IO[str]]) -> Iterator[str]:
    for h in handles:
        yield from h


def _sorted_by_time(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda r: str(r.get("time", "")))


def main(args: argparse.Namespace) -> int:
    now = datetime.datetime.now(datetime.timezone.utc)
    flt = Filter(
        refused_only=args.refused,
        since=parse_since(args.since, now) if args.since else None,
        events=frozenset(args.event),
    )
    names = args.files or _default_files()
    handles = [_open(n) for n in names]
    try:
        if args.follow:
            stream: Iterable[dict[str, Any]] = records(_follow(handles), flt)
        else:
            found = records(_all_lines(handles), flt)
            stream = _sorted_by_time(found) if len(handles) > 1 else found
        if args.json:
            for record in stream:
                print(json.dumps(record, ensure_ascii=False), flush=args.follow)
        elif args.follow:
            for record in stream:
                print(render_human(record), flush=True)
        else:
            for record, count in collapse(stream):
                print(render_human(record) + (f"  (x{count})" if count > 1 else ""))
    finally:
        for h in handles:
            if h is not sys.stdin:
                h.close()
    return EXIT_OK
