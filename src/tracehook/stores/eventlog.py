"""Event logs: one human line (stderr) and one JSON line (a log file) per event.

Every executable that acts on an operator's behalf (the post-build hook, the publisher, the
gate) reports each event twice: a short sentence a person reads where they already look
(stderr, which Nix relays as ``post-build-hook: ...`` and systemd sends to the journal), and
a JSON object on one line in a log file that ``tracehook log`` and scripts read back.

A JSON line always has ``time`` (UTC, ISO 8601 with milliseconds), ``event`` (what
happened: ``sign``, ``publish``, ...), ``outcome`` (``ok``, ``skipped``, ``duplicate``,
``failed``, ``kept``, ...) and ``reason`` (null unless the outcome needs one); then the
event's own fields. Writing the log never raises: a log file that cannot be written is
reported once on stderr and the event still goes to stderr.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tracehook.errors import ParseError


def _now() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def render(event: str, outcome: str, reason: str | None, fields: dict[str, Any]) -> str:
    """The JSON line (without newline) for one event."""
    record: dict[str, Any] = {"time": _now(), "event": event, "outcome": outcome, "reason": reason}
    for key, value in fields.items():
        if key not in record:
            record[key] = _jsonable(value)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)


@dataclass
class EventLog:
    """Where one program's events go. ``path`` None: stderr only.

    ``prefix`` starts each human line (``tracehook: ...``); ``stderr`` None silences the
    human lines (tests, ``--quiet``).
    """

    path: Path | None
    prefix: str = "tracehook"
    stderr: TextIO | None = field(default_factory=lambda: sys.stderr)
    _warned: bool = field(default=False, repr=False)

    def emit(
        self,
        event: str,
        outcome: str,
        human: str,
        *,
        reason: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Report one event; returns the JSON record written (also when the file failed)."""
        line = render(event, outcome, reason, fields)
        if self.stderr is not None:
            print(f"{self.prefix}: {human}", file=self.stderr, flush=True)
        if self.path is not None:
            self._append(line)
        record: dict[str, Any] = json.loads(line)
        return record

    def _append(self, line: str) -> None:
        assert self.path is not None
        data = (line + "\n").encode("utf-8", errors="surrogateescape")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: concurrent writers (parallel builds) never interleave within a line.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            if not self._warned and self.stderr is not None:
                print(
                    f"{self.prefix}: warning: cannot write log file {self.path}: "
                    f"{exc.strerror or exc}",
                    file=self.stderr,
                    flush=True,
                )
            self._warned = True


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a log file, in order; ParseError names the first bad line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except ValueError as exc:
                raise ParseError(f"log file {path} line {number}", str(exc)) from None
            if not isinstance(record, dict) or "event" not in record:
                raise ParseError(f"log file {path} line {number}", "not an event object")
            yield record
