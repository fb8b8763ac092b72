"""Reading event logs back: parse lines, filter, and render the compact human view. No I/O.

Input lines may be the JSON lines of a log file, or the gate's and the publisher's journal
lines, which carry the same record after a TAB (:func:`tracehook.stores.eventlog.parse_record`),
so ``journalctl -o cat -u tracehook-gate | tracehook log -`` shows what the log file does.
Lines without a record are counted (:class:`Tally`) and reported, never passed over
silently. Every field shown is escaped (:func:`tracehook.text.printable`): a log line's
contents came from traces, narinfos and .drv files, and must not start a line of their own.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tracehook.errors import ConfigError
from tracehook.stores.eventlog import parse_record
from tracehook.text import printable

# What --refused shows: refusals, failures, and tamper evidence (a path admitted another way).
REFUSED_OUTCOMES = frozenset({"refused", "failed", "rejected", "denied", "tampered",
                              "unavailable"})
_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Filter:
    refused_only: bool = False
    since: datetime.datetime | None = None
    events: frozenset[str] = frozenset()

    def matches(self, record: dict[str, Any]) -> bool:
        if self.refused_only and str(record.get("outcome")) not in REFUSED_OUTCOMES:
            return False
        if self.events and str(record.get("event")) not in self.events:
            return False
        if self.since is not None:
            when = record_time(record)
            if when is None or when < self.since:
                return False
        return True


def parse_since(text: str, now: datetime.datetime) -> datetime.datetime:
    """``--since``: an ISO 8601 time (UTC if no zone) or a span ago: 30s, 15m, 2h, 1d, 1w."""
    m = _RELATIVE.match(text.strip())
    if m:
        return now - datetime.timedelta(seconds=int(m.group(1)) * _UNIT_SECONDS[m.group(2)])
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: use an ISO time (2026-11-25T06:00:00Z) or a span (15m, 2h, 1d)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def record_time(record: dict[str, Any]) -> datetime.datetime | None:
    raw = record.get("time")
    if not isinstance(raw, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


@dataclass
class Tally:
    """What reading left out: lines that carry no event record (counted, the first named)."""

    unreadable: int = 0
    first: str | None = None  # "SOURCE line N"

    def note(self, source: str, number: int) -> None:
        self.unreadable += 1
        if self.first is None:
            self.first = f"{source} line {number}"

    def message(self) -> str | None:
        if not self.unreadable:
            return None
        return (f"{self.unreadable} line(s) could not be read as tracehook events and were "
                f"left out (first: {self.first}); see docs/OPERATIONS.md, \"Log lines\"")


Line = tuple[str, int, str]  # (source, line number, text)


def records(lines: Iterable[Line], flt: Filter, tally: Tally) -> Iterator[dict[str, Any]]:
    """The event records in ``lines`` that pass ``flt``; blank lines are skipped, other
    lines without a record are counted in ``tally``."""
    for source, number, line in lines:
        if not line.strip():
            continue
        record = parse_record(line)
        if record is None:
            tally.note(source, number)
        elif flt.matches(record):
            yield record


def _drv_name(record: dict[str, Any]) -> str:
    for key in ("name", "drv_name"):
        if isinstance(record.get(key), str) and record[key]:
            return str(record[key])
    for key in ("drv", "drv_path", "derivation", "path", "target"):
        value = record.get(key)
        if isinstance(value, str) and value.startswith("/"):
            base = value.rsplit("/", 1)[-1]
            base = base.split("-", 1)[1] if "-" in base else base
            return base.removesuffix(".drv")
    return "-"


def _show(value: object, width: int = 0) -> str:
    """A field on one line: whatever a log line holds is untrusted, so it is escaped."""
    text = printable(value if isinstance(value, str) else str(value))
    return f"{text:<{width}}" if width else text


def _evidence(record: dict[str, Any]) -> str:
    """What hardware evidence admitted it (the gate's ``allowed`` lines), compactly."""
    items = record.get("evidence")
    if not isinstance(items, list):
        return ""
    shown = [f"{e.get('element')} (measurement {str(e.get('measurement'))[:16]}..., chip "
             f"{str(e.get('chip_id'))[:16]}..., tcb {e.get('tcb')})"
             for e in items if isinstance(e, dict)]
    return f"hardware evidence {', '.join(shown)}" if shown else ""


def render_human(record: dict[str, Any]) -> str:
    """``time  event  name  outcome  reason``: one line a person scans."""
    when = record_time(record)
    stamp = when.strftime("%Y-%m-%d %H:%M:%S") if when else _show(record.get("time", "-"))
    reason = record.get("reason") or _admitted(record)
    parts = [
        stamp,
        _show(record.get("event", "-"), 9),
        _show(_drv_name(record), 28),
        _show(record.get("outcome", "-"), 9),
    ]
    line = "  ".join(parts)
    return f"{line}  {_show(reason)}".rstrip()


def _admitted(record: dict[str, Any]) -> str:
    """For an allowed path: what admitted it (traces by which keys, or a cache signature
    alone), never calling a cache-signed path verified."""
    if record.get("outcome") != "allowed":
        return ""
    trust = record.get("trust")

    def names(field: str) -> str:
        return ", ".join(str(k) for k in record.get(field) or ())

    if trust == "cache":
        return (f"accepted on a cache signature alone ({names('cache_keys')}); "
                f"{record.get('covered_without_traces', 0)} step(s) below covered without "
                "traces")
    if trust == "fixed":
        return "fixed output (pinned by its hash)"
    if trust == "traces":
        said = f"verified by traces ({names('signers')})"
        evidence = _evidence(record)
        if evidence:
            said += f"; {evidence}"
        if record.get("cache_signed"):
            said += (f"; relies on {len(record['cache_signed'])} path(s) below accepted on a "
                     "cache signature alone")
        return said
    return ""


COLLAPSE_WINDOW = datetime.timedelta(seconds=60)


def identity(record: dict[str, Any]) -> tuple[str, ...]:
    """What the view shows of an event, its time aside: two records with the same identity
    are the same event said again (Nix asks the gate several times for one step)."""
    return (str(record.get("event")), str(record.get("outcome")), _drv_name(record),
            str(record.get("reason") or ""))


@dataclass
class _Group:
    first: dict[str, Any]
    when: datetime.datetime | None
    count: int = 1

    def takes(self, when: datetime.datetime | None) -> bool:
        return (when is not None and self.when is not None
                and abs(when - self.when) <= COLLAPSE_WINDOW)


def collapse(items: Iterable[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """Each event once, as (first record, count): records with the same :func:`identity`
    within a minute of the group's first are counted into it, whatever came between them
    (concurrent requests for several steps interleave). Groups keep the order of their
    first records; one more than a minute after the first starts a new group."""
    groups: list[_Group] = []
    latest: dict[tuple[str, ...], _Group] = {}
    for record in items:
        key, when = identity(record), record_time(record)
        group = latest.get(key)
        if group is not None and group.takes(when):
            group.count += 1
            continue
        latest[key] = _Group(record, when)
        groups.append(latest[key])
    return [(g.first, g.count) for g in groups]
