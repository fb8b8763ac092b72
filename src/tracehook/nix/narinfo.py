"""Binary-cache ``.narinfo`` files: parse, render in Nix's field order, fingerprint.

A narinfo is ``Key: value`` lines. ``References`` holds base names separated by spaces,
``Sig`` may repeat; every other field appears at most once. Nix writes the fields as
StorePath, URL, Compression, FileHash, FileSize, NarHash, NarSize, References, Deriver,
System, Sig..., CA. Fields we do not know are kept, in order, and rendered last.

The signed fingerprint (Nix's ``ValidPathInfo::fingerprint``) is
``1;<store path>;<NarHash as sha256:nix32>;<NarSize>;<references as full paths, sorted,
comma separated>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tracehook.errors import ParseError
from tracehook.nix import nar, storepath

_SINGLE = (
    "StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize",
    "References", "Deriver", "System", "CA",
)


@dataclass(frozen=True)
class NarInfo:
    store_path: str
    nar_hash: str
    nar_size: int
    url: str | None = None
    compression: str | None = None
    file_hash: str | None = None
    file_size: int | None = None
    references: tuple[str, ...] = ()  # base names, as in the file
    deriver: str | None = None  # base name, as in the file
    system: str | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None
    unknown: tuple[tuple[str, str], ...] = field(default=())


def _int(value: str, key: str, what: str, where: dict[str, int]) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise ParseError(
            what, f"{key} must be a non-negative decimal integer, not {value!r}", where[key]
        )
    return int(value)


def parse(text: str, what: str = "narinfo") -> NarInfo:
    """Parse narinfo text; ParseError on malformed lines, duplicate fields, bad numbers,
    a missing StorePath, NarHash or NarSize, or a NarHash that is not sha256."""
    single: dict[str, str] = {}
    where: dict[str, int] = {}
    sigs: list[str] = []
    unknown: list[tuple[str, str]] = []
    pos = 0
    for line in text.split("\n"):
        start, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        key, sep, value = line.partition(": ")
        if not sep or not key:
            raise ParseError(what, f"line {line!r} is not 'Key: value'", start)
        if key == "Sig":
            sigs.append(value)
        elif key in _SINGLE:
            if key in single:
                raise ParseError(what, f"duplicate field {key}", start)
            single[key] = value
            where[key] = start
        else:
            unknown.append((key, value))
    for key in ("StorePath", "NarHash", "NarSize"):
        if key not in single:
            raise ParseError(what, f"missing {key}")
    nar_hash = single["NarHash"]
    try:
        nar.parse_nar_hash(nar_hash)  # validate; keep the text as written
    except ParseError as exc:
        raise ParseError(what, f"NarHash: {exc.message}", where["NarHash"]) from None
    file_size = single.get("FileSize")
    return NarInfo(
        store_path=single["StorePath"],
        url=single.get("URL"),
        compression=single.get("Compression"),
        file_hash=single.get("FileHash"),
        file_size=None if file_size is None else _int(file_size, "FileSize", what, where),
        nar_hash=nar_hash,
        nar_size=_int(single["NarSize"], "NarSize", what, where),
        references=tuple(single.get("References", "").split()),
        deriver=single.get("Deriver"),
        system=single.get("System"),
        sigs=tuple(sigs),
        ca=single.get("CA"),
        unknown=tuple(unknown),
    )


def render(ni: NarInfo, url: str | None = None, sigs: tuple[str, ...] | None = None) -> str:
    """The narinfo text in Nix's field order; absent optional fields are left out. ``url``
    and ``sigs``, when given, stand for the narinfo's own (the gate's answer: cheaper than
    a copy of the narinfo with them)."""
    lines = [f"StorePath: {ni.store_path}"]
    url = ni.url if url is None else url
    if url is not None:
        lines.append(f"URL: {url}")
    if ni.compression is not None:
        lines.append(f"Compression: {ni.compression}")
    if ni.file_hash is not None:
        lines.append(f"FileHash: {ni.file_hash}")
    if ni.file_size is not None:
        lines.append(f"FileSize: {ni.file_size}")
    lines.append(f"NarHash: {ni.nar_hash}")
    lines.append(f"NarSize: {ni.nar_size}")
    lines.append(f"References: {' '.join(ni.references)}")
    if ni.deriver is not None:
        lines.append(f"Deriver: {ni.deriver}")
    if ni.system is not None:
        lines.append(f"System: {ni.system}")
    lines.extend(f"Sig: {sig}" for sig in (ni.sigs if sigs is None else sigs))
    if ni.ca is not None:
        lines.append(f"CA: {ni.ca}")
    lines.extend(f"{key}: {value}" for key, value in ni.unknown)
    return "".join(line + "\n" for line in lines)


def fingerprint(ni: NarInfo, store_dir: str = storepath.STORE_DIR) -> str:
    """What a narinfo ``Sig`` signs: ``1;path;sha256:nix32;size;refs``.

    Raises ParseError if the store path is not in ``store_dir``, a reference is not a
    valid base name, or NarSize is 0 (Nix refuses to fingerprint those).
    """
    storepath.parse_store_path(ni.store_path, store_dir)
    if ni.nar_size == 0:
        raise ParseError("narinfo", f"NarSize of {ni.store_path} is 0; nothing to sign")
    digest = nar.parse_nar_hash(ni.nar_hash, "narinfo NarHash")
    refs = sorted({f"{store_dir}/{ref}" for ref in ni.references})
    for ref in refs:
        storepath.parse_store_path(ref, store_dir)
    return f"1;{ni.store_path};{nar.format_nar_hash(digest)};{ni.nar_size};{','.join(refs)}"


def with_signature(ni: NarInfo, sig: str) -> NarInfo:
    """``ni`` with ``sig`` appended to its signatures, unless it is already there."""
    if sig in ni.sigs:
        return ni
    return replace(ni, sigs=(*ni.sigs, sig))
