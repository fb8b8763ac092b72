"""Nix derivations: the data model and its ATerm serialization, byte for byte.

``Derive([outputs],[inputDrvs],[inputSrcs],platform,builder,[args],[env])``, as written by
Nix's ``Derivation::unparse``. Output fields, input paths and names, input sources and the
platform are written unquoted-unescaped (``printUnquotedString``); builder, args and env are
escaped (``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t``). Nix keeps outputs, inputs, sources and
env in sorted maps and sets, so :func:`serialize` always writes them sorted by their bytes and
without duplicates; the parser (:mod:`tracehook.nix.aterm`) insists on that form, so for
every file Nix writes ``serialize(parse(text)) == text`` and the hashes computed from a
parsed derivation are the ones Nix computes. Text is ``str``; read files as bytes and decode
with ``decode_drv`` (UTF-8, ``surrogateescape``) so arbitrary bytes round-trip.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from tracehook.errors import ParseError

DerivationKind = Literal["fixed", "floating-ca", "input-addressed", "deferred", "impure"]
OutputKind = DerivationKind
Method = Literal["nar", "text", "git", "flat"]

HASH_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64, "blake3": 32}
_METHOD_PREFIXES: tuple[tuple[str, Method], ...] = (
    ("r:", "nar"),
    ("text:", "text"),
    ("git:", "git"),
)
_HEX_RE = re.compile(r"[0-9a-f]*")
# Nix writes paths and the platform without escaping, so these characters cannot round-trip.
UNWRITABLE = re.compile(r'["\\]')


def decode_drv(data: bytes) -> str:
    """Bytes of a .drv file to text; ``encode_drv`` gives the same bytes back."""
    return data.decode("utf-8", errors="surrogateescape")


def encode_drv(text: str) -> bytes:
    """Text of a .drv to its bytes (inverse of ``decode_drv``)."""
    return text.encode("utf-8", errors="surrogateescape")


def bytes_key(s: str) -> bytes:
    """Sort key matching Nix's ``std::string`` order (bytewise)."""
    return s.encode("utf-8", errors="surrogateescape")


@dataclass(frozen=True)
class DerivationOutput:
    """One output entry, with the three raw ATerm fields."""

    path: str
    hash_algo: str
    hash: str

    @property
    def is_fixed(self) -> bool:
        return self.hash != "" and self.hash != "impure"

    @property
    def is_floating_ca(self) -> bool:
        return self.path == "" and self.hash_algo != "" and self.hash == ""

    @property
    def is_deferred(self) -> bool:
        return self.path == "" and self.hash_algo == "" and self.hash == ""

    @property
    def is_impure(self) -> bool:
        return self.hash_algo != "" and self.hash == "impure"

    @property
    def method(self) -> Method:
        for prefix, method in _METHOD_PREFIXES:
            if self.hash_algo.startswith(prefix):
                return method
        return "flat"

    @property
    def algo(self) -> str:
        for prefix, _ in _METHOD_PREFIXES:
            if self.hash_algo.startswith(prefix):
                return self.hash_algo[len(prefix) :]
        return self.hash_algo

    @functools.cached_property
    def kind(self) -> OutputKind:
        """The output's kind, as Nix's ``parseDerivationOutput`` decides it (once per
        output: its fields are immutable strings).

        Raises ParseError (without a position) for field combinations Nix rejects or would
        not write back unchanged.
        """
        what = "derivation output"
        if self.hash_algo == "":
            if self.hash != "":
                raise ParseError(what, "a hash without a hash algorithm")
            if self.path == "":
                return "deferred"
            check_path(self.path, what)
            return "input-addressed"
        size = HASH_SIZES.get(self.algo)
        if size is None:
            raise ParseError(what, f"unknown hash algorithm {self.hash_algo!r}")
        if self.hash == "impure":
            if self.path != "":
                raise ParseError(what, "an impure output must not name a path")
            return "impure"
        if self.hash == "":
            if self.path != "":
                raise ParseError(what, "a floating content-addressed output must not name a path")
            return "floating-ca"
        check_path(self.path, what)
        if len(self.hash) != 2 * size or not _HEX_RE.fullmatch(self.hash):
            raise ParseError(what, f"hash is not {2 * size} lowercase hex digits")
        return "fixed"


def check_path(path: str, what: str) -> None:
    if not path.startswith("/"):
        raise ParseError(what, f"path {path!r} is not absolute")
    if UNWRITABLE.search(path):
        raise ParseError(what, f"path {path!r} contains a quote or backslash")


@dataclass(frozen=True)
class Derivation:
    """A parsed derivation. Mappings iterate in file (= sorted) order."""

    outputs: dict[str, DerivationOutput]
    input_drvs: dict[str, tuple[str, ...]]
    input_srcs: tuple[str, ...]
    platform: str
    builder: str
    args: tuple[str, ...]
    env: dict[str, str]

    @property
    def name(self) -> str:
        """The derivation's name: ``env["name"]``, or ``name`` in ``__json`` (structured
        attributes). Nix takes it from the .drv path; the two agree for real derivations."""
        if "name" in self.env:
            return self.env["name"]
        raw = self.env.get("__json")
        if raw is not None:
            try:
                attrs = json.loads(raw)
            except ValueError as e:
                raise ParseError("derivation", f"__json is not JSON: {e}") from None
            name = attrs.get("name") if isinstance(attrs, dict) else None
            if isinstance(name, str):
                return name
        raise ParseError("derivation", "no name in env or __json")

    @functools.cached_property
    def aterm(self) -> str:
        """The ATerm Nix writes for this derivation (:func:`serialize`); for one parsed from
        canonical text (what Nix writes), that text itself."""
        return serialize(self)

    @functools.cached_property
    def kind(self) -> DerivationKind:
        """The derivation's type, as Nix's ``Derivation::type()`` decides it (once: the
        fields are never changed)."""
        return derivation_kind(self.outputs)


def derivation_kind(outputs: Mapping[str, DerivationOutput]) -> DerivationKind:
    """All outputs must be of one kind; a fixed-output derivation has only ``out``."""
    if len(outputs) == 1:
        [(name, out)] = outputs.items()
        if out.kind == "fixed" and name != "out":
            raise ParseError(
                "derivation", "a fixed-output derivation has exactly one output, 'out'"
            )
        return out.kind
    kinds = {name: out.kind for name, out in outputs.items()}
    found = set(kinds.values())
    if not found:
        raise ParseError("derivation", "no outputs")
    if len(found) > 1:
        detail = ", ".join(f"{n}: {k}" for n, k in kinds.items())
        raise ParseError("derivation", f"outputs are of different kinds ({detail})")
    kind = found.pop()
    if kind == "fixed" and list(outputs) != ["out"]:
        raise ParseError("derivation", "a fixed-output derivation has exactly one output, 'out'")
    return kind


# ---------------------------------------------------------------------------------- parsing



_ESCAPES = str.maketrans({'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _unquoted(s: str) -> str:
    return '"' + s + '"'


def _quoted(s: str) -> str:
    return '"' + (s if _NEEDS_ESCAPE.search(s) is None else s.translate(_ESCAPES)) + '"'


_NEEDS_ESCAPE = re.compile(r'["\\\n\r\t]')


def quote_list(items: list[str]) -> str:
    """``"a","b"`` (unescaped), or nothing for no items."""
    return '"' + '","'.join(items) + '"' if items else ""


def _sorted(items: Iterable[str]) -> list[str]:
    unique = set(items)
    if "".join(unique).isascii():
        return sorted(unique)  # code point order is byte order for ASCII
    return sorted(unique, key=bytes_key)


def serialize(drv: Derivation) -> str:
    """The ATerm Nix writes for ``drv`` (its ``Derivation::unparse``)."""
    return serialize_modulo(drv, None, mask_outputs=False)


def serialize_modulo(
    drv: Derivation,
    actual_inputs: Mapping[str, Collection[str]] | None,
    mask_outputs: bool,
) -> str:
    """Nix's ``unparse(store, maskOutputs, actualInputs)``, used by hashDerivationModulo.

    ``actual_inputs`` replaces the inputDrvs (keys are written as given, sorted, usually hex
    hashes); ``mask_outputs`` blanks the output paths and the env vars named after outputs.
    Output fields, input paths and names, sources and the platform are written unescaped.
    """
    return _unparse(drv, _middle(drv, actual_inputs), mask_outputs)


def serialize_modulo_both(
    drv: Derivation, actual_inputs: Mapping[str, Collection[str]]
) -> tuple[str, str]:
    """``serialize_modulo`` unmasked and masked, what they share written once."""
    middle = _middle(drv, actual_inputs)
    return _unparse(drv, middle, False), _unparse(drv, middle, True)


def _middle(drv: Derivation, actual_inputs: Mapping[str, Collection[str]] | None) -> str:
    """From the input derivations to the arguments: what masking leaves alone."""
    inputs = drv.input_drvs if actual_inputs is None else actual_inputs
    return "".join((
        "],[", input_entries(inputs), "],[", quote_list(_sorted(drv.input_srcs)),
        "],", _unquoted(drv.platform), ",", _quoted(drv.builder), ",[",
        ",".join([_quoted(a) for a in drv.args]), "],[",
    ))


def input_entries(inputs: Mapping[str, Collection[str]]) -> str:
    """The entries of an inputDrvs list: ``("<key>",["<output>",...])``, sorted, unescaped."""
    entries = []
    for key in _sorted(inputs):
        names = inputs[key]
        if len(names) == 1:  # (most often)
            for name in names:
                entries.append(f'("{key}",["{name}"])')
        else:
            entries.append(f'("{key}",[{quote_list(_sorted(names))}])')
    return ",".join(entries)


def outputs_text(drv: Derivation, mask_outputs: bool) -> str:
    """The entries of the outputs list (with blank paths when ``mask_outputs``)."""
    outputs = drv.outputs
    return ",".join(
        f'("{name}","{"" if mask_outputs else o.path}","{o.hash_algo}","{o.hash}")'
        for name in _sorted(outputs)
        for o in (outputs[name],)
    )


def env_pair(key: str, value: str) -> str:
    """One entry of the env list."""
    return f"({_quoted(key)},{_quoted(value)})"


def _unparse(drv: Derivation, middle: str, mask_outputs: bool) -> str:
    outputs = drv.outputs
    env = drv.env
    pairs = ",".join(
        env_pair(key, "" if mask_outputs and key in outputs else env[key]) for key in _sorted(env)
    )
    return "".join(("Derive([", outputs_text(drv, mask_outputs), middle, pairs, "])"))
