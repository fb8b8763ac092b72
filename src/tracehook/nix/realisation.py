"""Nix realisations (build-trace entries) in binary caches, in both on-disk forms.

* Nix 2.4 to 2.34: ``realisations/<id>.doi``, ``id = sha256:<hex>!<output>``, one line of
  compact JSON with sorted keys and no newline:
  ``{"dependentRealisations":{<id>:<out basename>},"id":...,"outPath":...,"signatures":[...]}``.
  Signatures are ``name:base64`` over the same JSON without ``signatures``
  (``Realisation::fingerprint``); checked against Nix 2.8's own output in the tests.
* Nix 2.35: ``build-trace-v2/<drv basename>/<output>.doi`` holds only the value,
  ``{"outPath":...,"signatures":[{"keyName":...,"sig":<base64>}]}``; the key is in the URL.

Store paths in both are base names (``<hash>-<name>``), as Nix writes them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tracehook.errors import ParseError
from tracehook.nix import storepath

_ID = re.compile(r"sha256:([0-9a-f]{64})!(.+)", re.ASCII | re.DOTALL)


@dataclass(frozen=True)
class Realisation:
    """One build-trace entry. ``id`` is ``sha256:<hex>!<output>`` for v1 entries and
    ``<drv basename>^<output>`` for v2 entries; ``signatures`` are ``name:base64``."""

    id: str
    out_path: str
    signatures: tuple[str, ...] = ()
    dependent_realisations: dict[str, str] = field(default_factory=dict, hash=False)


# --- ids and keys ---------------------------------------------------------------------------


def check_output_name(output: str, what: str = "output name") -> None:
    """ParseError unless ``output`` is a valid output name (store path name characters,
    not ``.`` or ``..``): safe to put in a URL path or a file name."""
    storepath.check_name(output, what)


def parse_realisation_id(s: str, what: str = "realisation id") -> tuple[str, str]:
    """``sha256:<64 lowercase hex>!<output>`` -> (hex, output); ParseError otherwise."""
    m = _ID.fullmatch(s)
    if m is None:
        raise ParseError(what, f"{s[:120]!r} is not 'sha256:<64 lowercase hex>!<output name>'")
    try:
        check_output_name(m.group(2), what)
    except ParseError as exc:
        raise ParseError(what, exc.message, m.start(2) + (exc.position or 0)) from None
    return m.group(1), m.group(2)


def _check_basename(base: str, what: str) -> None:
    try:
        storepath.parse_store_path(f"{storepath.STORE_DIR}/{base}")
    except ParseError as exc:
        raise ParseError(what, f"{base[:120]!r} is not a '<hash>-<name>' store path base name: "
                         f"{exc.message}") from None


def parse_build_trace_key(drv_basename: str, output: str) -> tuple[str, str]:
    """Validate a v2 key: a ``.drv`` store path base name and an output name."""
    what = "build trace key"
    _check_basename(drv_basename, what)
    if not drv_basename.endswith(".drv"):
        raise ParseError(what, f"{drv_basename[:120]!r} is not a derivation (.drv) base name")
    check_output_name(output, what)
    return drv_basename, output


def build_trace_id(drv_basename: str, output: str) -> str:
    """Nix 2.35's rendering of a v2 key (``DrvOutput::to_string``): ``<drv>^<output>``."""
    return f"{drv_basename}^{output}"


# --- JSON ------------------------------------------------------------------------------------


# One encoder for every dump: ``json.dumps`` with options makes a new one at each call, a
# third of the cost of dumping a realisation (the gate writes one for every answer).
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _dumps(obj: Any) -> str:
    """As nlohmann's ``dump()``: compact, sorted keys (std::map), UTF-8 unescaped."""
    return _ENCODER.encode(obj)


def _loads(data: bytes | str, what: str) -> dict[str, Any]:
    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise ValueError("duplicate key")
        return obj

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        obj = json.loads(text, object_pairs_hook=no_dupes)
    except UnicodeDecodeError:
        raise ParseError(what, "not UTF-8") from None
    except ValueError as exc:
        raise ParseError(what, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ParseError(what, f"JSON {type(obj).__name__} where an object belongs")
    return obj


def _str_field(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ParseError(what, f"'{key}' is missing or not a string")
    return value


def _signature_strings(value: Any, what: str) -> tuple[str, ...]:
    """Signatures as ``name:base64``: from strings (v1) or ``{keyName, sig}`` (v2)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ParseError(what, "'signatures' is not a list")
    sigs: list[str] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            sig = item
        elif isinstance(item, dict):
            name, b64 = item.get("keyName"), item.get("sig")
            if not isinstance(name, str) or not isinstance(b64, str):
                raise ParseError(what, f"signatures[{i}] lacks string 'keyName' and 'sig'")
            sig = f"{name}:{b64}"
        else:
            raise ParseError(what, f"signatures[{i}] is neither a string nor an object")
        name, sep, _ = sig.partition(":")
        if not sep or not name:
            raise ParseError(what, f"signatures[{i}] is not '<key name>:<base64>'")
        if sig not in sigs:
            sigs.append(sig)
    return tuple(sigs)


# --- v1: realisations/<id>.doi ------------------------------------------------------------


def parse_doi_v1(data: bytes | str, what: str = "realisation") -> Realisation:
    obj = _loads(data, what)
    rid = _str_field(obj, "id", what)
    parse_realisation_id(rid, f"{what} id")
    out_path = _str_field(obj, "outPath", what)
    _check_basename(out_path, f"{what} outPath")
    deps_raw = obj.get("dependentRealisations", {})
    if not isinstance(deps_raw, dict):
        raise ParseError(what, "'dependentRealisations' is not an object")
    deps: dict[str, str] = {}
    for dep_id, dep_out in deps_raw.items():
        parse_realisation_id(dep_id, f"{what} dependentRealisations key")
        if not isinstance(dep_out, str):
            raise ParseError(what, f"dependentRealisations[{dep_id!r}] is not a string")
        _check_basename(dep_out, f"{what} dependentRealisations value")
        deps[dep_id] = dep_out
    return Realisation(rid, out_path, _signature_strings(obj.get("signatures"), what), deps)


def _v1_object(r: Realisation) -> dict[str, Any]:
    return {
        "dependentRealisations": dict(r.dependent_realisations),
        "id": r.id,
        "outPath": r.out_path,
    }


def render_doi_v1(r: Realisation) -> str:
    """The file as Nix writes it: one line of compact sorted JSON, no newline."""
    return _dumps({**_v1_object(r), "signatures": sorted(set(r.signatures))})


def fingerprint_v1(r: Realisation) -> str:
    """What a v1 signature signs: the JSON without ``signatures``, compact, sorted keys."""
    return _dumps(_v1_object(r))


# --- v2: build-trace-v2/<drv basename>/<output>.doi ----------------------------------------


def parse_doi_v2(data: bytes | str, drv_path: str, output: str,
                 what: str = "build trace entry") -> Realisation:
    """Parse the value file; ``drv_path`` (base name or full path) and ``output`` come from
    its location. The result's ``id`` is ``<drv basename>^<output>``."""
    drv_base, output = parse_build_trace_key(storepath.basename(drv_path), output)
    obj = _loads(data, what)
    out_path = _str_field(obj, "outPath", what)
    _check_basename(out_path, f"{what} outPath")
    sigs = _signature_strings(obj.get("signatures"), what)
    return Realisation(build_trace_id(drv_base, output), out_path, sigs, {})


def render_doi_v2(r: Realisation) -> str:
    """``{"outPath":...,"signatures":[{"keyName":...,"sig":...}]}``, compact, sorted."""
    sigs = []
    for sig in sorted(set(r.signatures)):
        name, _, b64 = sig.partition(":")
        sigs.append({"keyName": name, "sig": b64})
    return _dumps({"outPath": r.out_path, "signatures": sigs})


def fingerprint_v2(drv_basename: str, output: str, out_path: str) -> str:
    """UNVERIFIED against a running Nix 2.35: what we believe its signatures sign.

    From reading Nix's source (``UnkeyedRealisation::fingerprint(key)``): the keyed JSON
    ``{"key":{"drvPath":<drv basename>,"outputName":<output>},"value":{"outPath":<basename>}}``
    with ``value.signatures`` erased, dumped compact with sorted keys. Nix 2.35 is not
    on the project's machines; confirm with a real 2.35 signature before relying on it.
    """
    parse_build_trace_key(drv_basename, output)
    return _dumps({
        "key": {"drvPath": drv_basename, "outputName": output},
        "value": {"outPath": out_path},
    })
