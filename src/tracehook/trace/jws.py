"""laut v2 traces: JWS compact serialization with Ed25519, and the trace-store file.

A trace is ``b64url(header) "." b64url(payload) "." b64url(signature)``. The signature
covers the exact ``b64url(header) "." b64url(payload)`` bytes as transmitted; we keep
those bytes and verify over them, never over a re-serialization.

How laut (v2, Python, PyJWT) serializes, as measured on the conformance traces:

* header: compact JSON (``","``/``":"`` separators), keys **sorted**, including
  ``"typ":"JWT"`` (PyJWT adds it):
  ``{"alg":"EdDSA","crv":"Ed25519","detachHash":"nix-ca-path","kid":"<name>:<thumb16>",
  "typ":"JWT","type":"laut","v":"2"}``;
* payload: compact JSON, keys in insertion order (``in``, ``out``, ``builder``),
  non-ASCII escaped as ``\\uXXXX``;
* base64url without padding.

The trace-store file ``<store>/traces/<rdrv hash>`` is ``{"signatures": [jws, ...]}``,
written by laut as ``json.dumps(obj, indent=2)`` plus a newline.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tracehook.errors import ParseError
from tracehook.trace import crypto

ALG = "EdDSA"
CRV = "Ed25519"
LAUT_TYPE = "laut"
LAUT_VERSION = "2"
DETACH_HASH = "nix-ca-path"

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


# --- base64url and JSON ------------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_PADDING = ("", "", "==", "=")  # by len % 4 (1 is never valid)
_VALUES = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
_SPARE_BITS = (0, 0, 0xF, 0x3)  # low bits of the last character that encode nothing


def b64url_decode(s: str, what: str, position: int = 0) -> bytes:
    """Strict base64url without padding; the canonical encoding only."""
    if not _B64URL.fullmatch(s) or len(s) % 4 == 1:
        raise ParseError(what, "not base64url without padding", position)
    rest = len(s) % 4
    if rest and _VALUES[s[-1]] & _SPARE_BITS[rest]:  # two strings would mean one value
        raise ParseError(what, "non-canonical base64url (nonzero trailing bits)", position)
    try:
        return binascii.a2b_base64(s.encode("ascii").translate(_TO_STANDARD) + _PADDING[rest]
                                   .encode("ascii"))
    except (binascii.Error, ValueError):
        raise ParseError(what, "not base64url without padding", position) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def loads_object(data: bytes, what: str, position: int | None = None) -> dict[str, Any]:
    """Strict JSON object: UTF-8, no duplicate keys, no NaN/Infinity."""
    try:
        obj = _STRICT_JSON.decode(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ParseError(what, "not UTF-8", position) from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ParseError(what, f"not JSON: {exc}", position) from None
    if not isinstance(obj, dict):
        raise ParseError(what, f"JSON {type(obj).__name__} where an object belongs", position)
    return obj


def dumps_compact(obj: Mapping[str, Any]) -> bytes:
    """Compact JSON, keys in the order given, non-ASCII escaped (as laut/PyJWT)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


# --- JWS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Jws:
    """A parsed JWS in compact serialization. ``signing_input`` is what was signed."""

    compact: str
    signing_input: bytes
    header: dict[str, Any] = field(hash=False)
    payload: dict[str, Any] = field(hash=False)
    payload_bytes: bytes
    signature: bytes


def parse_compact(s: str, what: str = "JWS") -> Jws:
    """Parse ``header.payload.signature``; ParseError on anything malformed.

    Header and payload must be base64url JSON objects; the header's ``alg`` must be
    ``EdDSA`` (``none`` and every other algorithm are refused) and its ``crv``, if
    present, ``Ed25519``. Unknown header and payload fields are kept.
    """
    if not isinstance(s, str) or not s.isascii():
        raise ParseError(what, "not an ASCII string")
    parts = s.split(".")
    if len(parts) != 3:
        raise ParseError(
            what, f"{len(parts)} dot-separated parts, compact serialization has 3"
        )
    h64, p64, s64 = parts
    p_pos, s_pos = len(h64) + 1, len(h64) + len(p64) + 2
    if not h64 or not p64:
        raise ParseError(what, "empty header or payload part", 0 if not h64 else p_pos)
    header = loads_object(b64url_decode(h64, what, 0), f"{what} header", None)
    payload_bytes = b64url_decode(p64, what, p_pos)
    payload = loads_object(payload_bytes, f"{what} payload", None)
    signature = b64url_decode(s64, what, s_pos)
    if "alg" not in header:
        raise ParseError(f"{what} header", "no 'alg'; laut traces are signed with EdDSA")
    if header["alg"] != ALG:
        raise ParseError(
            f"{what} header", f"alg {header['alg']!r} refused; only {ALG!r} is accepted"
        )
    if "crv" in header and header["crv"] != CRV:
        raise ParseError(f"{what} header", f"crv {header['crv']!r} refused; only {CRV!r}")
    return Jws(
        compact=s,
        signing_input=f"{h64}.{p64}".encode("ascii"),
        header=header,
        payload=payload,
        payload_bytes=payload_bytes,
        signature=signature,
    )


def sign_compact(
    sk: crypto.SecretKey, header: Mapping[str, Any], payload: Mapping[str, Any]
) -> str:
    """Serialize (compact JSON, keys in the order given) and sign with Ed25519."""
    if header.get("alg") != ALG:
        raise ValueError(f"header alg must be {ALG!r}, got {header.get('alg')!r}")
    h64, p64 = b64url_encode(dumps_compact(header)), b64url_encode(dumps_compact(payload))
    signing_input = f"{h64}.{p64}"
    sig = crypto.sign(sk, signing_input.encode("ascii"))
    return f"{signing_input}.{b64url_encode(sig)}"


def verify(jws: Jws, pk: crypto.PublicKey) -> None:
    """Verify over the exact transmitted bytes; raises BadSignature."""
    crypto.verify(pk, jws.signing_input, jws.signature)


def laut_kid(pk_name: str, pk: crypto.PublicKey) -> str:
    """``<name>:<first 16 hex of sha256(SPKI DER)>``."""
    return f"{pk_name}:{crypto.thumbprint16(pk)}"


def laut_header(pk_name: str, pk: crypto.PublicKey, *, typ_jwt: bool = False) -> dict[str, str]:
    """The laut v2 header, keys in laut's (sorted) order.

    ``typ_jwt=True`` adds ``"typ":"JWT"`` as laut's Python signer (PyJWT) does; with it,
    ``sign_compact`` reproduces laut's traces byte for byte.
    """
    header = {
        "alg": ALG,
        "crv": CRV,
        "detachHash": DETACH_HASH,
        "kid": laut_kid(pk_name, pk),
    }
    if typ_jwt:
        header["typ"] = "JWT"
    header["type"] = LAUT_TYPE
    header["v"] = LAUT_VERSION
    return header


def kid_of(jws: Jws) -> str | None:
    """The header's ``kid`` if it is a string, else None."""
    kid = jws.header.get("kid")
    return kid if isinstance(kid, str) else None


def peek_kid(token: str) -> str | None:
    """The ``kid`` in a compact JWS's header, read without parsing the rest (None if the
    header does not parse or has no string ``kid``). Says nothing about the signature."""
    header, sep, _ = token.partition(".")
    if not sep:
        return None
    try:
        kid = loads_object(b64url_decode(header, "header"), "header").get("kid")
    except ParseError:
        return None
    return kid if isinstance(kid, str) else None


def split_kid(kid: str) -> tuple[str, str]:
    """``name:thumb16`` -> (name, thumb16); the name is everything before the last ':'."""
    name, sep, thumb = kid.rpartition(":")
    if not sep or not name or not thumb:
        raise ParseError("kid", f"{kid!r} is not '<key name>:<thumbprint>'")
    return name, thumb


# --- trace-store files --------------------------------------------------------------------


@dataclass(frozen=True)
class TraceFile:
    """A trace-store file as read: its string entries in order, and how many were skipped."""

    signatures: tuple[str, ...]
    skipped: int  # entries that are not strings (never a trace); writers drop them


_BOM = b"\xef\xbb\xbf"


def _collect_signatures(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Object hook: every ``signatures`` list of an object, concatenated in file order."""
    obj: dict[str, Any] = {}
    lists: list[Any] = []
    for key, value in pairs:
        if key == "signatures":
            lists.append(value)
        else:
            obj[key] = value
    if lists:
        obj["signatures"] = _Duplicates(lists) if len(lists) > 1 else lists[0]
    return obj


class _Duplicates(list[Any]):
    """The values of a key that appears more than once in one object."""


_TRACE_JSON = json.JSONDecoder(object_pairs_hook=_collect_signatures,
                               parse_constant=_reject_constant)


def read_trace_file(data: bytes, what: str = "trace file") -> TraceFile:
    """``{"signatures": [jws, ...]}`` -> the string entries, unparsed and in order.

    One malformed entry must not hide the others (docs/FORMAT.md, section 5):

    * an entry that is not a string is skipped and counted (``skipped``); a string entry is
      returned whatever it holds, for the caller to parse one by one;
    * one leading UTF-8 byte order mark is ignored;
    * a ``signatures`` key given more than once: the entries of every occurrence that is a
      list, in file order (an occurrence that is not a list counts as one skipped entry);
    * other top-level keys are ignored.

    ParseError ("malformed trace file ...") when the file is not UTF-8 JSON, not an object,
    or has no ``signatures`` list.
    """
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        obj = _TRACE_JSON.decode(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ParseError(what, "not UTF-8") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ParseError(what, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ParseError(what, f"JSON {type(obj).__name__} where an object belongs")
    if "signatures" not in obj:
        raise ParseError(what, "no 'signatures' key; expected {\"signatures\": [...]}")
    value = obj["signatures"]
    occurrences = list(value) if isinstance(value, _Duplicates) else [value]
    lists = [v for v in occurrences if isinstance(v, list)]
    if not lists:
        raise ParseError(what, f"'signatures' is a JSON {type(value).__name__}, not a list")
    skipped = len(occurrences) - len(lists)
    signatures: list[str] = []
    for entries in lists:
        for entry in entries:
            if isinstance(entry, str):
                signatures.append(entry)
            else:
                skipped += 1
    return TraceFile(tuple(signatures), skipped)


def parse_trace_file(data: bytes, what: str = "trace file") -> list[str]:
    """The string entries of a trace-store file (:func:`read_trace_file`, count dropped)."""
    return list(read_trace_file(data, what).signatures)


def render_trace_file(signatures: Iterable[str]) -> bytes:
    """The file as laut writes it: 2-space indented JSON and a trailing newline."""
    return (json.dumps({"signatures": list(signatures)}, indent=2) + "\n").encode("ascii")


def merge_signatures(existing: Iterable[str], new: Iterable[str]) -> list[str]:
    """Existing entries first, in order, then new ones; exact duplicates kept once.

    Nothing else is dropped: another signer's entry survives every merge."""
    merged: list[str] = []
    seen: set[str] = set()
    for entry in (*existing, *new):
        if entry not in seen:
            seen.add(entry)
            merged.append(entry)
    return merged
