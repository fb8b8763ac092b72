"""Showing untrusted text: one line, no control characters, so a log line cannot be forged.

A ``kid`` in an unsigned trace entry, a narinfo field, a .drv name or an upstream's error
message is chosen by whoever wrote it. Written as it is into a journal line, a log file's
human view or a CLI report, a newline in it would start a line that looks like our own
("tracehook-gate: allowed ..."). :func:`printable` shows every control character (C0, DEL,
C1, the Unicode line and paragraph separators) and a backslash as a Python-style escape, so
the text stays on one line and reads back unambiguously. JSON lines need no such care: the
JSON encoder escapes control characters itself.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group(0)
    named = _NAMED.get(ch)
    if named is not None:
        return named
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def printable(text: str) -> str:
    """``text`` on one line, with control characters and backslashes escaped."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text)
