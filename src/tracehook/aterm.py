"""Nix derivations (.drv files) in their ATerm form: parse and serialize, byte for byte.

``Derive([outputs],[inputDrvs],[inputSrcs],platform,builder,[args],[env])``, as written by
Nix's ``Derivation::unparse``. Output fields, input paths and names, input sources and the
platform are written unquoted-unescaped (``printUnquotedString``); builder, args and env are
escaped (``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t``). Parsing turns ``\\n``, ``\\r``, ``\\t``
into their characters and any other backslashed character into itself, as Nix does; a path or
the platform that would contain a quote or backslash is rejected, since Nix could not write it
back.

Nix keeps outputs, inputs, sources and env in sorted maps and sets, so every file Nix writes
lists them sorted by their bytes and without duplicates. The parser insists on that canonical
form (a duplicate or unsorted entry is a ParseError), and ``serialize`` always writes it, so
for every file Nix writes ``serialize(parse(text)) == text`` and the hashes computed from a
parsed derivation are the ones Nix computes. Text is ``str``; read files as bytes and decode
with ``decode_drv`` (UTF-8, ``surrogateescape``) so arbitrary bytes round-trip.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

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
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")
_HEX_RE = re.compile(r"[0-9a-f]*")
# Nix writes paths and the platform without escaping, so these characters cannot round-trip.
_UNWRITABLE = re.compile(r'["\\]')


def decode_drv(data: bytes) -> str:
    """Bytes of a .drv file to text; ``encode_drv`` gives the same bytes back."""
    return data.decode("utf-8", errors="surrogateescape")


def encode_drv(text: str) -> bytes:
    """Text of a .drv to its bytes (inverse of ``decode_drv``)."""
    return text.encode("utf-8", errors="surrogateescape")


def _bkey(s: str) -> bytes:
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
            _check_path(self.path, what)
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
        _check_path(self.path, what)
        if len(self.hash) != 2 * size or not _HEX_RE.fullmatch(self.hash):
            raise ParseError(what, f"hash is not {2 * size} lowercase hex digits")
        return "fixed"


def _check_path(path: str, what: str) -> None:
    if not path.startswith("/"):
        raise ParseError(what, f"path {path!r} is not absolute")
    if _UNWRITABLE.search(path):
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


class _Parser:
    def __init__(self, text: str, what: str) -> None:
        self.text = text
        self.pos = 0
        self.what = what

    def fail(self, message: str, pos: int | None = None) -> ParseError:
        return ParseError(self.what, message, self.pos if pos is None else pos)

    def expect(self, literal: str) -> None:
        if not self.text.startswith(literal, self.pos):
            found = self.text[self.pos : self.pos + len(literal)]
            got = repr(found) if found else "end of input"
            raise self.fail(f"expected {literal!r}, found {got}")
        self.pos += len(literal)

    def peek(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos)

    def string(self) -> str:
        self.expect('"')
        text, start = self.text, self.pos
        end = text.find('"', start)
        if end < 0:
            raise self.fail("unterminated string", start - 1)
        if text.find("\\", start, end) < 0:
            self.pos = end + 1
            return text[start:end]
        parts: list[str] = []
        pos = start
        while True:
            quote = text.find('"', pos)
            backslash = text.find("\\", pos)
            if quote < 0:
                raise self.fail("unterminated string", start - 1)
            if backslash < 0 or quote < backslash:
                parts.append(text[pos:quote])
                self.pos = quote + 1
                return "".join(parts)
            # backslash < quote, so the escaped character exists (it may be the quote).
            parts.append(text[pos:backslash])
            c = text[backslash + 1]
            parts.append({"n": "\n", "r": "\r", "t": "\t"}.get(c, c))
            pos = backslash + 2

    def strings(self) -> list[tuple[int, str]]:
        """A bracketed list of strings, each with its start position."""
        self.expect("[")
        items: list[tuple[int, str]] = []
        if self.peek("]"):
            self.pos += 1
            return items
        while True:
            items.append((self.pos, self.string()))
            if self.peek("]"):
                self.pos += 1
                return items
            self.expect(",")

    def list_of(self, item: Callable[[], None]) -> None:
        """Parse ``[item,item,...]``; ``item`` parses one element."""
        self.expect("[")
        if self.peek("]"):
            self.pos += 1
            return
        while True:
            item()
            if self.peek("]"):
                self.pos += 1
                return
            self.expect(",")


def _check_sorted(items: Iterable[tuple[int, str]], p: _Parser, what: str) -> None:
    previous: bytes | None = None
    for pos, value in items:
        key = _bkey(value)
        if previous is not None:
            if key == previous:
                raise p.fail(f"duplicate {what} {value!r}", pos)
            if key < previous:
                raise p.fail(f"{what} {value!r} is out of order (Nix writes them sorted)", pos)
        previous = key


def _check_encodable(text: str, what: str) -> None:
    try:
        encode_drv(text)
    except UnicodeEncodeError as e:
        raise ParseError(what, "text contains a character that is not UTF-8", e.start) from None


def parse(text: str, what: str = "derivation") -> Derivation:
    """Parse the ATerm text of a derivation; ParseError with a position on anything else.

    A well-formed derivation is read by :func:`_parse_fast`; anything it does not accept is
    read again by :func:`_parse_checked`, which says what is wrong and where.
    """
    if text.isascii() or _is_encodable(text):
        fast = _parse_fast(text)
        if fast is not None:
            drv, cuts = fast
            if "\\" not in text[:cuts.quoted_from] and _canonical(text[cuts.quoted_from:]):
                drv.__dict__["aterm"] = text  # seed the cached property: serialize(drv) == text
                drv.__dict__["_cuts"] = cuts
            return drv
    return _parse_checked(text, what)


_ESCAPE_PAIR = re.compile(r"\\(.)", re.S)


def aterm_parts(drv: Derivation) -> tuple[str, str, str] | None:
    """The derivation's :attr:`~Derivation.aterm` cut around its inputs and sources:
    ``("Derive([outputs]", '"platform",', "builder, args and env)")``; None where the fast
    reader does not take that text (it then needs the long way)."""
    cuts: _Cuts | None = drv.__dict__.get("_cuts")
    text = drv.aterm
    if cuts is None:  # not parsed from this text: find the cuts in the serialization
        fast = _parse_fast(text)
        if fast is None:
            return None
        cuts = drv.__dict__["_cuts"] = fast[1]
    return (text[:cuts.outputs_end], text[cuts.platform_from:cuts.quoted_from],
            text[cuts.quoted_from:])


def _canonical(text: str) -> bool:
    """Whether the quoted fields (builder, args, env) in ``text`` are written as
    :func:`serialize` writes them. The fast parser accepts only sorted, duplicate-free
    ``Derive(`` text, and the fields before the builder are written as they are (so
    with no backslash at all, which the caller checks); what remains is how quoted strings
    are written: Nix escapes newline, carriage return and tab, and writes no escapes but
    these three, ``\\"`` and ``\\\\``."""
    if "\n" in text or "\r" in text or "\t" in text:
        return False
    if "\\" not in text:
        return True
    return all(c in 'nrt"\\' for c in _ESCAPE_PAIR.findall(text))


def _parse_checked(text: str, what: str) -> Derivation:
    """The reference parser: one step at a time, with a position for every error."""
    _check_encodable(text, what)
    p = _Parser(text, what)
    if p.peek("DrvWithVersion("):
        raise p.fail("versioned derivations (DrvWithVersion) are not supported")
    p.expect("Derive(")

    outputs: dict[str, DerivationOutput] = {}
    output_names: list[tuple[int, str]] = []

    def output() -> None:
        start = p.pos
        p.expect("(")
        name_pos = p.pos
        name = p.string()
        p.expect(",")
        path = p.string()
        p.expect(",")
        hash_algo = p.string()
        p.expect(",")
        hash_ = p.string()
        p.expect(")")
        if not _NAME_RE.fullmatch(name):
            raise p.fail(f"invalid output name {name!r}", name_pos)
        out = DerivationOutput(path, hash_algo, hash_)
        try:
            out.kind  # noqa: B018  (validates the fields)
        except ParseError as e:
            raise p.fail(f"output {name!r}: {e.message}", start) from None
        output_names.append((name_pos, name))
        outputs[name] = out

    p.list_of(output)
    _check_sorted(output_names, p, "output")
    p.expect(",")

    input_drvs: dict[str, tuple[str, ...]] = {}
    drv_paths: list[tuple[int, str]] = []

    def input_drv() -> None:
        p.expect("(")
        path_pos = p.pos
        path = p.string()
        p.expect(",")
        if p.peek("("):
            raise p.fail("dynamic-derivation inputs are not supported")
        names = p.strings()
        p.expect(")")
        _check_path_at(p, path, path_pos)
        _check_sorted(names, p, "output name")
        for pos, n in names:
            if not _NAME_RE.fullmatch(n):
                raise p.fail(f"invalid output name {n!r}", pos)
        drv_paths.append((path_pos, path))
        input_drvs[path] = tuple(n for _, n in names)

    p.list_of(input_drv)
    _check_sorted(drv_paths, p, "input derivation")
    p.expect(",")

    srcs = p.strings()
    _check_sorted(srcs, p, "input source")
    for pos, src in srcs:
        _check_path_at(p, src, pos)
    p.expect(",")
    platform_pos = p.pos
    platform = p.string()
    if _UNWRITABLE.search(platform):
        raise p.fail("the platform contains a quote or backslash", platform_pos)
    p.expect(",")
    builder = p.string()
    p.expect(",")
    args = tuple(s for _, s in p.strings())
    p.expect(",")

    env: dict[str, str] = {}
    env_keys: list[tuple[int, str]] = []

    def env_pair() -> None:
        p.expect("(")
        key_pos = p.pos
        key = p.string()
        p.expect(",")
        value = p.string()
        p.expect(")")
        env_keys.append((key_pos, key))
        env[key] = value

    p.list_of(env_pair)
    _check_sorted(env_keys, p, "environment variable")
    p.expect(")")
    if p.pos != len(text):
        raise p.fail("trailing data after the derivation")
    try:
        derivation_kind(outputs)
    except ParseError as e:
        raise p.fail(e.message, 0) from None
    return Derivation(
        outputs=outputs,
        input_drvs=input_drvs,
        input_srcs=tuple(s for _, s in srcs),
        platform=platform,
        builder=builder,
        args=args,
        env=env,
    )


def _is_encodable(text: str) -> bool:
    try:
        encode_drv(text)
    except UnicodeEncodeError:
        return False
    return True


# The fast reader: one regular expression per list entry. It accepts exactly what
# _parse_checked accepts (the same checks, done in bulk) and returns None on anything else.
_S = r'"([^"\\]*(?:\\.[^"\\]*)*)"'  # a string; group 1 is its raw (escaped) body
_STRING = re.compile(_S, re.S)
_OUTPUT = re.compile(rf"\({_S},{_S},{_S},{_S}\)", re.S)
_NAMES = r'(?:"[A-Za-z0-9+\-._?=]+"(?:,"[A-Za-z0-9+\-._?=]+")*)?'
_INPUT = re.compile(rf"\({_S},\[({_NAMES})\]\)", re.S)
_PAIR = re.compile(rf"\({_S},{_S}\)", re.S)
_ESCAPE = re.compile(r"\\(.)", re.S)
_UNESCAPES = {"n": "\n", "r": "\r", "t": "\t"}


def _unescape(raw: str) -> str:
    if "\\" not in raw:
        return raw
    return _ESCAPE.sub(lambda m: _UNESCAPES.get(m[1], m[1]), raw)


def _strictly_sorted(items: Sequence[str]) -> bool:
    """Sorted by bytes without duplicates (code point order is byte order for ASCII)."""
    if "".join(items).isascii():
        return list(items) == sorted(set(items))
    keys = [_bkey(s) for s in items]
    return all(a < b for a, b in itertools.pairwise(keys))


def _writable_path(path: str) -> bool:
    return path.startswith("/") and _UNWRITABLE.search(path) is None


def _fast_list(text: str, pos: int, item: re.Pattern[str]) -> tuple[list[re.Match[str]], int]:
    """``[item,item,...]`` at ``pos``: the matches and the position after ``]``, or pos -1."""
    if not text.startswith("[", pos):
        return [], -1
    pos += 1
    matches: list[re.Match[str]] = []
    if text.startswith("]", pos):
        return matches, pos + 1
    while True:
        m = item.match(text, pos)
        if m is None:
            return [], -1
        matches.append(m)
        pos = m.end()
        if text.startswith("]", pos):
            return matches, pos + 1
        if not text.startswith(",", pos):
            return [], -1
        pos += 1


def _fast_string(text: str, pos: int) -> tuple[str, int]:
    m = _STRING.match(text, pos)
    return ("", -1) if m is None else (_unescape(m[1]), m.end())


class _Cuts(NamedTuple):
    """Where the parts of a derivation's ATerm are: the end of the outputs list, the start
    of the platform, the start of the builder (the first field written with escapes)."""

    outputs_end: int
    platform_from: int
    quoted_from: int


def _parse_fast(text: str) -> tuple[Derivation, _Cuts] | None:
    if not text.startswith("Derive("):
        return None
    raw_outputs, pos = _fast_list(text, 7, _OUTPUT)
    if pos < 0 or not text.startswith(",", pos):
        return None
    outputs_end = pos
    outputs: dict[str, DerivationOutput] = {}
    for m in raw_outputs:
        name, path, algo, hash_ = map(_unescape, m.groups())
        out = DerivationOutput(path, algo, hash_)
        try:
            out.kind  # noqa: B018  (validates the fields)
        except ParseError:
            return None
        if not _NAME_RE.fullmatch(name):
            return None
        outputs[name] = out
    if len(outputs) != len(raw_outputs) or not _strictly_sorted(list(outputs)):
        return None

    raw_inputs, pos = _fast_list(text, pos + 1, _INPUT)
    if pos < 0 or not text.startswith(",", pos):
        return None
    input_drvs: dict[str, tuple[str, ...]] = {}
    for m in raw_inputs:
        path = _unescape(m[1])
        names = tuple(m[2][1:-1].split('","')) if m[2] else ()
        if not _writable_path(path) or not _strictly_sorted(names):
            return None
        input_drvs[path] = names
    if len(input_drvs) != len(raw_inputs) or not _strictly_sorted(list(input_drvs)):
        return None

    raw_srcs, pos = _fast_list(text, pos + 1, _STRING)
    srcs = tuple(_unescape(m[1]) for m in raw_srcs)
    if pos < 0 or not text.startswith(",", pos) or not _strictly_sorted(srcs):
        return None
    if not all(_writable_path(src) for src in srcs):
        return None
    platform_from = pos + 1
    platform, pos = _fast_string(text, platform_from)
    if pos < 0 or not text.startswith(",", pos) or _UNWRITABLE.search(platform):
        return None
    quoted_from = pos + 1
    builder, pos = _fast_string(text, pos + 1)
    if pos < 0 or not text.startswith(",", pos):
        return None
    raw_args, pos = _fast_list(text, pos + 1, _STRING)
    if pos < 0 or not text.startswith(",", pos):
        return None
    raw_env, pos = _fast_list(text, pos + 1, _PAIR)
    if pos < 0 or pos != len(text) - 1 or not text.endswith(")"):
        return None
    env = {_unescape(m[1]): _unescape(m[2]) for m in raw_env}
    if len(env) != len(raw_env) or not _strictly_sorted(list(env)):
        return None
    try:
        derivation_kind(outputs)
    except ParseError:
        return None
    return Derivation(
        outputs=outputs,
        input_drvs=input_drvs,
        input_srcs=srcs,
        platform=platform,
        builder=builder,
        args=tuple(_unescape(m[1]) for m in raw_args),
        env=env,
    ), _Cuts(outputs_end, platform_from, quoted_from)


def _check_path_at(p: _Parser, path: str, pos: int) -> None:
    try:
        _check_path(path, p.what)
    except ParseError as e:
        raise p.fail(e.message, pos) from None


# ----------------------------------------------------------------------------- serializing

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
    return sorted(unique, key=_bkey)


def serialize(drv: Derivation) -> str:
    """The ATerm Nix writes for ``drv`` (its ``Derivation::unparse``)."""
    return serialize_modulo(drv, None, mask_outputs=False)


def serialize_modulo(
    drv: Derivation,
    actual_inputs: Mapping[str, Iterable[str]] | None,
    mask_outputs: bool,
) -> str:
    """Nix's ``unparse(store, maskOutputs, actualInputs)``, used by hashDerivationModulo.

    ``actual_inputs`` replaces the inputDrvs (keys are written as given, sorted, usually hex
    hashes); ``mask_outputs`` blanks the output paths and the env vars named after outputs.
    Output fields, input paths and names, sources and the platform are written unescaped.
    """
    outputs = drv.outputs
    outs = ",".join(
        f'("{name}","{"" if mask_outputs else o.path}","{o.hash_algo}","{o.hash}")'
        for name in _sorted(outputs)
        for o in (outputs[name],)
    )
    inputs = drv.input_drvs if actual_inputs is None else actual_inputs
    entries = ",".join(f'("{key}",[{quote_list(_sorted(inputs[key]))}])' for key in _sorted(inputs))
    env = drv.env
    pairs = ",".join(
        f"({_quoted(key)},{_quoted('' if mask_outputs and key in outputs else env[key])})"
        for key in _sorted(env)
    )
    return "".join((
        "Derive([", outs, "],[", entries, "],[", quote_list(_sorted(drv.input_srcs)),
        "],", _unquoted(drv.platform), ",", _quoted(drv.builder), ",[",
        ",".join([_quoted(a) for a in drv.args]), "],[", pairs, "])",
    ))
