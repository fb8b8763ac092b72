"""Reading Nix derivations (.drv files) in their ATerm form.

Parsing turns ``\\n``, ``\\r``, ``\\t`` into their characters and any other backslashed
character into itself, as Nix does; a path or the platform that would contain a quote or
backslash is rejected, since Nix could not write it back. Nix writes every list sorted by
its bytes and without duplicates, and the parser insists on that canonical form (a duplicate
or unsorted entry is a ParseError), so ``serialize(parse(text)) == text`` for every file
Nix writes (:mod:`tracehook.nix.derivation`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from tracehook.errors import ParseError
from tracehook.nix.derivation import (
    UNWRITABLE,
    Derivation,
    DerivationOutput,
    bytes_key,
    check_path,
    derivation_kind,
    encode_drv,
)

_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")


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
        key = bytes_key(value)
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


PlainDerivation = tuple[Any, ...]


def to_plain(drv: Derivation) -> PlainDerivation:
    """A derivation as plain values (for ``marshal``), with its ATerm and cuts when known,
    so that :func:`from_plain` gives back one that resolves as fast as a parsed one."""
    cuts = drv.__dict__.get("_cuts")
    return (tuple((n, o.path, o.hash_algo, o.hash) for n, o in drv.outputs.items()),
            tuple(drv.input_drvs.items()), drv.input_srcs, drv.platform, drv.builder,
            drv.args, tuple(drv.env.items()), drv.__dict__.get("aterm"),
            tuple(cuts) if cuts is not None else None)


def from_plain(plain: PlainDerivation) -> Derivation:
    outputs, inputs, srcs, platform, builder, args, env, text, cuts = plain
    drv = Derivation({n: DerivationOutput(p, a, h) for n, p, a, h in outputs},
                     {k: tuple(v) for k, v in inputs}, tuple(srcs), platform, builder,
                     tuple(args), dict(env))
    if text is not None:
        drv.__dict__["aterm"] = text
        if cuts is not None:
            drv.__dict__["_cuts"] = _Cuts(*cuts)
    return drv


_ESCAPE_PAIR = re.compile(r"\\(.)", re.S)


def aterm_parts(drv: Derivation, read_only: bool = False) -> tuple[str, str, str] | None:
    """The derivation's :attr:`~Derivation.aterm` cut around its inputs and sources:
    ``("Derive([outputs]", '"platform",', "builder, args and env)")``; None where the fast
    reader does not take that text (it then needs the long way), and with ``read_only``
    where the derivation was not read from such a text (finding the cuts would then cost a
    serialization)."""
    cuts: _Cuts | None = drv.__dict__.get("_cuts")
    if cuts is None and read_only:
        return None
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
    if UNWRITABLE.search(platform):
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
    keys = [bytes_key(s) for s in items]
    return all(a < b for a, b in itertools.pairwise(keys))


def _writable_path(path: str) -> bool:
    return path.startswith("/") and UNWRITABLE.search(path) is None


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
    if pos < 0 or not text.startswith(",", pos) or UNWRITABLE.search(platform):
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
        check_path(path, p.what)
    except ParseError as e:
        raise p.fail(e.message, pos) from None


# ----------------------------------------------------------------------------- serializing
