"""A trace-store file with its evidence: ``{"signatures": [...], "evidence": [...]}``. Pure.

Section 5 of docs/FORMAT.md defines the file as ``{"signatures": [jws, ...]}``; section 9.2
adds an optional ``evidence`` list beside it (hardware evidence; laut ignores it). This
module reads and writes both, for the trace stores:

- **reading**: the signatures exactly as :func:`tracehook.trace.jws.parse_trace_file` reads
  them (the one place that decides what a signatures list may hold), and the evidence
  entries as raw JSON values, in order, each to be read on its own by whoever checks it
  (:mod:`tracehook.verify.evidencecheck`): a malformed entry hides no other. A duplicated
  ``evidence`` key contributes every list it holds; an ``evidence`` that is not a list is
  reported in :attr:`TraceDocument.problems` and hides no signature.
- **writing**: every entry already in the file is kept as read (another signer's evidence
  is never re-encoded or dropped); new signatures and entries are appended, exact
  duplicates once. A file without evidence is written byte for byte as laut writes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tracehook.errors import ParseError
from tracehook.trace.jws import merge_signatures, parse_trace_file

EVIDENCE_FIELD = "evidence"


@dataclass(frozen=True)
class TraceDocument:
    """A trace file as read: its signatures, its evidence entries (raw JSON values), and
    what could not be read of the evidence field (the signatures still count)."""

    signatures: tuple[str, ...] = ()
    evidence: tuple[Any, ...] = ()
    problems: tuple[str, ...] = ()

    def merged(self, signatures: Iterable[str], evidence: Iterable[Any] = ()
               ) -> TraceDocument:
        """This file with ``signatures`` and ``evidence`` appended (exact duplicates once)."""
        return TraceDocument(tuple(merge_signatures(self.signatures, signatures)),
                             tuple(merge_evidence(self.evidence, evidence)), self.problems)

    def same_content(self, other: TraceDocument) -> bool:
        return (self.signatures, [evidence_id(e) for e in self.evidence]) == (
            other.signatures, [evidence_id(e) for e in other.evidence])


class _Lists(list[Any]):
    """Every value of an ``evidence`` key that appears more than once in one object."""


def _collect(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key == EVIDENCE_FIELD and key in obj:
            prior = obj[key]
            obj[key] = _Lists([*(prior if isinstance(prior, _Lists) else [prior]), value])
        else:
            obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_collect, parse_constant=_reject_constant)


def read_trace_document(data: bytes, what: str = "trace file") -> TraceDocument:
    """The signatures and evidence entries of a trace file. ParseError when the file itself
    is malformed (as :func:`~tracehook.trace.jws.parse_trace_file` decides)."""
    signatures = tuple(parse_trace_file(data, what))
    if b"evidence" not in data and b"\\u" not in data:  # no such key, not even escaped
        return TraceDocument(signatures)
    try:
        obj = _DECODER.decode(data.decode("utf-8").removeprefix("\ufeff"))
    except ValueError as exc:  # the signatures were read: a decoder quirk, not a file error
        raise ParseError(what, f"not JSON: {exc}") from None
    if not isinstance(obj, dict) or EVIDENCE_FIELD not in obj:
        return TraceDocument(signatures)
    value = obj[EVIDENCE_FIELD]
    occurrences = list(value) if isinstance(value, _Lists) else [value]
    entries: list[Any] = []
    problems: list[str] = []
    for occurrence in occurrences:
        if isinstance(occurrence, list):
            entries.extend(occurrence)
        else:
            problems.append(f"{what}: 'evidence' is a JSON {type(occurrence).__name__}, "
                            "not a list")
    return TraceDocument(signatures, tuple(entries), tuple(problems))


def render_trace_document(doc: TraceDocument) -> bytes:
    """2-space indented JSON and a newline, as laut writes a trace file; ``evidence``
    after ``signatures``, only when there is some."""
    obj: dict[str, Any] = {"signatures": list(doc.signatures)}
    if doc.evidence:
        obj[EVIDENCE_FIELD] = list(doc.evidence)
    return (json.dumps(obj, indent=2) + "\n").encode("ascii")


def evidence_id(entry: Any) -> str:
    """An evidence entry as canonical JSON (sorted keys, compact): equal entries, equal ids."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def merge_evidence(existing: Iterable[Any], new: Iterable[Any]) -> list[Any]:
    """Existing entries first, as read, then new ones; an entry equal (as JSON, whatever
    its key order) to one already there is kept once. Nothing else is dropped."""
    merged: list[Any] = []
    seen: set[str] = set()
    for entry in (*existing, *new):
        ident = evidence_id(entry)
        if ident not in seen:
            seen.add(ident)
            merged.append(entry)
    return merged
