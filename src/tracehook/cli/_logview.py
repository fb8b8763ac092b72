"""Reading event logs back: parse lines, filter, and render the compact human view. No I/O.

Input lines may be the JSON lines of a log file, or lines that carry such a JSON object
after a prefix (``post-build-hook: {...}`` as Nix relays it, or a journal line), so that
``journalctl -o cat -u tracehook-gate | tracehook log`` works as well as the files do.
Lines without an event object (the human lines) are passed over.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tracehook.errors import ConfigError

REFUSED_OUTCOMES = frozenset({"refused", "failed", "rejected", "denied"})
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


def parse_line(line: str) -> dict[str, Any] | None:
    """The event object in ``line``, or None for a line that carries none."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        record = json.loads(line[start:])
    except ValueError:
        return None
    if isinstance(record, dict) and "event" in record and "outcome" in record:
        return record
    return None


def records(lines: Iterable[str], flt: Filter) -> Iterator[dict[str, Any]]:
    for line in lines:
        record = parse_line(line)
        if record is not None and flt.matches(record):
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
    """``time  event  name  outcome  reason``: one line a person scans (for an admission
    by hardware evidence, which evidence)."""
    when = record_time(record)
    stamp = when.strftime("%Y-%m-%d %H:%M:%S") if when else str(record.get("time", "-"))
    reason = record.get("reason") or _evidence(record)
    parts = [
        stamp,
        f"{record.get('event', '-')!s:<9}",
        f"{_drv_name(record):<28}",
        f"{record.get('outcome', '-')!s:<9}",
    ]
    line = "  ".join(parts)
    return f"{line}  {reason}".rstrip()


COLLAPSE_WINDOW = datetime.timedelta(seconds=60)


def _same_event(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same event again, within a minute of the first."""
    if any(a.get(k) != b.get(k) for k in ("event", "outcome", "reason")):
        return False
    ta, tb = record_time(a), record_time(b)
    if ta is None or tb is None or abs(tb - ta) > COLLAPSE_WINDOW:
        return False
    return _drv_name(a) == _drv_name(b)


def collapse(items: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], int]]:
    """Runs of the same event (event, derivation, outcome, reason, within a minute of the
    run's first) as (first record, count): Nix asks the gate several times for one refused
    step, and one line says it."""
    run: dict[str, Any] | None = None
    count = 0
    for record in items:
        if run is not None and _same_event(run, record):
            count += 1
            continue
        if run is not None:
            yield run, count
        run, count = record, 1
    if run is not None:
        yield run, count
