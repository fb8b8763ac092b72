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

The human line (docs/OPERATIONS.md, "Log lines")::

    PROGRAM: SENTENCE                 the hook (Nix shows it on the building terminal)
    PROGRAM: SENTENCE<TAB>JSON        ``journal=True``: the gate and the publisher

SENTENCE is shown with :func:`tracehook.text.printable`: a newline, a tab or any other
control character in it (a ``kid`` from an unsigned trace entry, a narinfo field, an
upstream's error text) is escaped, so one event is one line and cannot pose as another.
JSON is the event's record, the same bytes as the log file's line: it has no raw control
character either (the encoder escapes them, and this module escapes DEL, C1 and the Unicode
line separators as well). So the only TAB on a journal line is the one before JSON, and
``journalctl -o cat -u tracehook-gate | tracehook log -`` reads back exactly the records
the log file holds (:func:`parse_record`). Each line, newline included, is written with
one ``write`` call under one lock, so concurrent requests never run lines together.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tracehook.errors import ParseError
from tracehook.text import printable

# Characters JSON may carry raw that a terminal or a line splitter treats specially: DEL,
# the C1 controls (0x9b is a terminal's CSI), NEL, and the Unicode line/paragraph separators.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")

# One lock for every line written to a stream by any EventLog in this process.
_WRITE_LOCK = threading.Lock()


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


def dumps(record: dict[str, Any]) -> str:
    """``record`` as one line of compact JSON that no terminal or line splitter breaks."""
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
    # Raw, these can only sit inside JSON strings, where the escape means the same.
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def render(event: str, outcome: str, reason: str | None, fields: dict[str, Any]) -> str:
    """The JSON line (without newline) for one event."""
    record: dict[str, Any] = {"time": _now(), "event": event, "outcome": outcome, "reason": reason}
    for key, value in fields.items():
        if key not in record:
            record[key] = _jsonable(value)
    return dumps(record)


def human_line(prefix: str, human: str, record_line: str | None = None) -> str:
    """``PREFIX: SENTENCE`` (``<TAB>JSON`` after it when given), newline included."""
    text = f"{prefix}: {printable(human)}"
    if record_line is not None:
        text += f"\t{record_line}"
    return text + "\n"


def write_line(stream: TextIO, text: str) -> None:
    """Write one whole line with one ``write`` call; never raise."""
    with _WRITE_LOCK:
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not stop the work
            pass


@dataclass
class EventLog:
    """Where one program's events go. ``path`` None: stderr only.

    ``prefix`` starts each human line (``tracehook: ...``); ``stderr`` None silences the
    human lines (tests, ``--quiet``); ``journal`` appends the JSON record to each human
    line (daemons whose stderr is the journal: the gate, the publisher).
    """

    path: Path | None
    prefix: str = "tracehook"
    stderr: TextIO | None = field(default_factory=lambda: sys.stderr)
    journal: bool = False
    _warned: bool = field(default=False, repr=False)

    @property
    def silent(self) -> bool:
        """Whether events go nowhere (a caller may then skip building them)."""
        return self.stderr is None and self.path is None

    def emit(
        self,
        event: str,
        outcome: str,
        human: str,
        *,
        reason: str | None = None,
        **fields: Any,
    ) -> None:
        """Report one event (nothing is rendered when it goes nowhere)."""
        if self.silent:
            return
        line = render(event, outcome, reason, fields)
        if self.stderr is not None:
            write_line(self.stderr, human_line(self.prefix, human,
                                               line if self.journal else None))
        if self.path is not None:
            self._append(line)

    def _append(self, line: str) -> None:
        assert self.path is not None
        data = (line + "\n").encode("utf-8", errors="surrogateescape")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            # O_APPEND: concurrent writers (parallel builds) never interleave within a line.
            # Opened per line, so a rotated (moved) log file is left alone at once.
            try:
                fd = os.open(self.path, flags, 0o644)
            except FileNotFoundError:  # its directory does not exist (yet): make it
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, flags, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            if not self._warned and self.stderr is not None:
                write_line(self.stderr, human_line(
                    self.prefix, f"warning: cannot write log file {self.path}: "
                    f"{exc.strerror or exc}"))
            self._warned = True


def _is_record(obj: object) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("event"), str) and "outcome" in obj


def parse_record(line: str) -> dict[str, Any] | None:
    """The event record a line carries, or None.

    A line of a log file is the JSON record itself; a human line written with
    ``journal=True`` (perhaps behind the journal's own ``DATE HOST UNIT[PID]: ``) carries it
    after its last TAB. Nothing else is read as a record: the sentence before the TAB is
    never parsed, whatever it contains.
    """
    text = line.strip("\r\n ")
    if not text.startswith("{"):
        _, tab, tail = text.rpartition("\t")
        if not tab:
            return None
        text = tail.strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if _is_record(obj) else None


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
