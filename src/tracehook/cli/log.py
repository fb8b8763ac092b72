"""``tracehook log``: read the hook, publisher and gate logs.

    tracehook log                         # every log in the default places (below)
    tracehook log --refused --since 1h    # what was refused in the last hour, and why
    tracehook log /var/log/tracehook-gate/gate.log --follow
    journalctl -o cat -u tracehook-gate | tracehook log --refused -

Without FILE it reads every ``*.log`` in /var/log/tracehook (the hook's and the
publisher's ``log-file``) and /var/log/tracehook-gate (the gate's, as the NixOS module
runs it), and the file in ``$TRACEHOOK_GATE_LOG`` (the gate's ``--log-file``). It reads log
files (JSON lines) and the gate's and publisher's journal lines (the same record after a
TAB); lines that carry no record are counted and reported on stderr. Exit 0, 2 for a bad
flag, 3 when no log can be read.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from tracehook.cli._logview import (
    Filter,
    Line,
    Tally,
    collapse,
    parse_since,
    records,
    render_human,
)
from tracehook.errors import EXIT_OK, EnvironmentFault
from tracehook.stores.eventlog import dumps

# The hook's and publisher's default log directory, and the gate's (the NixOS module's
# LogsDirectory); $TRACEHOOK_GATE_LOG is the gate's --log-file when set in the environment.
DEFAULT_LOG_DIRS = (Path("/var/log/tracehook"), Path("/var/log/tracehook-gate"))
GATE_LOG_ENV = "TRACEHOOK_GATE_LOG"
POLL_SECONDS = 0.5


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "log",
        help="read the hook, publisher and gate logs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "files", nargs="*", metavar="FILE",
        help="log files, or '-' for stdin (default: every *.log in "
        f"{', '.join(map(str, DEFAULT_LOG_DIRS))}, and ${GATE_LOG_ENV})",
    )
    p.add_argument("--refused", action="store_true",
                   help="only refusals, failures and tamper evidence")
    p.add_argument("--since", metavar="TIME", help="ISO time, or a span ago: 15m, 2h, 1d")
    p.add_argument("--event", action="append", default=[], help="only this event (repeatable)")
    p.add_argument("--follow", "-f", action="store_true", help="keep reading as lines arrive")
    p.add_argument("--json", action="store_true", help="print the JSON lines, not the view")
    p.set_defaults(func=main)


def default_files() -> list[str]:
    """Every log in the default places, or an EnvironmentFault saying where it looked."""
    found: dict[str, None] = {}
    for directory in DEFAULT_LOG_DIRS:
        try:
            found.update(dict.fromkeys(sorted(str(p) for p in directory.glob("*.log")
                                              if p.is_file())))
        except OSError:
            continue
    gate_log = os.environ.get(GATE_LOG_ENV)
    if gate_log and Path(gate_log).is_file():
        found[gate_log] = None
    if not found:
        where = " or ".join(str(d) for d in DEFAULT_LOG_DIRS)
        raise EnvironmentFault(
            f"no log files in {where} (nor ${GATE_LOG_ENV}); name one, or pipe the "
            "journal: journalctl -o cat -u tracehook-gate | tracehook log -"
        )
    return list(found)


def _open(name: str) -> IO[str]:
    if name == "-":
        return sys.stdin
    try:
        return open(name, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise EnvironmentFault(f"cannot read log {name}: {exc.strerror or exc}") from None


def _label(name: str) -> str:
    return "stdin" if name == "-" else name


def _follow(handles: list[tuple[str, IO[str]]]) -> Iterator[Line]:
    """Every line of every handle, then new lines as they are appended (until Ctrl-C)."""
    numbers = [0] * len(handles)
    while True:
        got = False
        for i, (name, h) in enumerate(handles):
            line = h.readline()
            while line:
                got = True
                numbers[i] += 1
                yield name, numbers[i], line
                line = h.readline()
        if not got:
            time.sleep(POLL_SECONDS)


def _all_lines(handles: list[tuple[str, IO[str]]]) -> Iterator[Line]:
    for name, h in handles:
        for number, line in enumerate(h, start=1):
            yield name, number, line


def _sorted_by_time(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda r: str(r.get("time", "")))


def _print(text: str, flush: bool = False) -> None:
    sys.stdout.write(text + "\n")  # one write per line
    if flush:
        sys.stdout.flush()


def main(args: argparse.Namespace) -> int:
    now = datetime.datetime.now(datetime.timezone.utc)
    flt = Filter(
        refused_only=args.refused,
        since=parse_since(args.since, now) if args.since else None,
        events=frozenset(args.event),
    )
    names = args.files or default_files()
    handles: list[tuple[str, IO[str]]] = []
    tally = Tally()
    try:
        for n in names:
            handles.append((_label(n), _open(n)))
        if args.follow:
            for record in records(_follow(handles), flt, tally):
                _print(dumps(record) if args.json else render_human(record), flush=True)
        else:
            found = records(_all_lines(handles), flt, tally)
            stream = _sorted_by_time(found) if len(handles) > 1 else found
            if args.json:
                for record in stream:
                    _print(dumps(record))
            else:
                for record, count in collapse(stream):
                    _print(render_human(record) + (f"  (x{count})" if count > 1 else ""))
    finally:
        for _, h in handles:
            if h is not sys.stdin:
                h.close()
        note = tally.message()
        if note is not None:
            sys.stderr.write(f"tracehook log: {note}\n")
    return EXIT_OK
