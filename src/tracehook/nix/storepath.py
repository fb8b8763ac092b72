"""Nix store paths: parsing, validation, and the ways Nix computes them.

Every store path is ``<store_dir>/<hash>-<name>``, where ``<hash>`` is 20 bytes in nix32:
the XOR-folded sha256 of the fingerprint ``<type>:sha256:<hex>:<store_dir>:<name>``
(Nix's ``makeStorePath``). The ``type`` says what the inner hash is of: ``text`` (+ its
references) for .drv files and text files, ``source`` for NAR-hashed sha256 content,
``output:<name>`` for derivation outputs and other fixed outputs.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable

from tracehook.errors import ParseError
from tracehook.nix import nixbase32
from tracehook.nix.derivation import Derivation, encode_drv

STORE_DIR = "/nix/store"
HASH_BYTES = 20
HASH_CHARS = nixbase32.hash_len(HASH_BYTES)  # 32
MAX_NAME_LEN = 211
_NAME_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-._?=")
_NAME_RE = re.compile(rf"[0-9a-zA-Z+\-._?=]{{1,{MAX_NAME_LEN}}}")
_HASH_RE = re.compile(f"[{nixbase32.ALPHABET}]{{{HASH_CHARS}}}")


_STORE_PREFIX = STORE_DIR + "/"
_DEFAULT_STORE_PATH_RE = re.compile(
    f"{re.escape(_STORE_PREFIX)}[{nixbase32.ALPHABET}]{{{HASH_CHARS}}}-"
    f"(?!\\.)[0-9a-zA-Z+\\-._?=]{{1,{MAX_NAME_LEN}}}"
)


def compress_hash(digest: bytes, size: int) -> bytes:
    """Fold ``digest`` to ``size`` bytes by XOR (Nix's ``compressHash``)."""
    folded = 0
    for i in range(0, len(digest), size):
        folded ^= int.from_bytes(digest[i : i + size].ljust(size, b"\0"), "big")
    return folded.to_bytes(size, "big")


def check_name(name: str, what: str = "store path name") -> None:
    """Raise ParseError unless ``name`` is a valid store path name (Nix's ``checkName``)."""
    if _NAME_RE.fullmatch(name) and not name.startswith("."):
        return  # the common case; anything else is diagnosed below
    if not name:
        raise ParseError(what, "name is empty", 0)
    if len(name) > MAX_NAME_LEN:
        raise ParseError(what, f"name is longer than {MAX_NAME_LEN} characters", MAX_NAME_LEN)
    for pos, c in enumerate(name):
        if c not in _NAME_CHARS:
            raise ParseError(what, f"name {name!r} contains illegal character {c!r}", pos)
    first = name.split("-", 1)[0]
    if first in (".", ".."):
        raise ParseError(what, f"name {name!r} must not start with {first!r}", 0)


def make_store_path(
    type_: str,
    inner_digest: bytes,
    name: str,
    store_dir: str = STORE_DIR,
    *,
    inner_algo: str = "sha256",
) -> str:
    """``makeStorePath(type, hash, name)``; the inner hash is sha256 unless stated."""
    check_name(name)
    fingerprint = f"{type_}:{inner_algo}:{inner_digest.hex()}:{store_dir}:{name}"
    digest = hashlib.sha256(fingerprint.encode()).digest()
    return f"{store_dir}/{nixbase32.encode(compress_hash(digest, HASH_BYTES))}-{name}"


def _make_type(type_: str, references: Iterable[str], self_reference: bool = False) -> str:
    # A StorePathSet sorts by base name; with one store dir that is the full path's order.
    unique = set(references)
    if "".join(unique).isascii() and all(r.startswith(_STORE_PREFIX) for r in unique):
        refs = sorted(unique)  # one store dir: full paths sort as their base names
    else:
        refs = sorted(unique, key=lambda p: basename(p).encode())
    return type_ + "".join(":" + r for r in refs) + (":self" if self_reference else "")


def make_text_path(
    name: str, content: bytes, references: Iterable[str] = (), store_dir: str = STORE_DIR
) -> str:
    """The path of a text file added with references (``computeStorePathForText``)."""
    return make_store_path(
        _make_type("text", references), hashlib.sha256(content).digest(), name, store_dir
    )


def derivation_path(drv: Derivation, store_dir: str = STORE_DIR, name: str | None = None) -> str:
    """The store path Nix gives ``drv`` when it writes it (``writeDerivation``).

    ``name`` defaults to ``drv.name``; pass the name from an existing path when known.
    """
    refs = [*drv.input_srcs, *drv.input_drvs]
    drv_name = drv.name if name is None else name
    return make_text_path(drv_name + ".drv", encode_drv(drv.aterm), refs, store_dir)


def make_fixed_output_path(
    method: str,
    algo: str,
    digest: bytes,
    name: str,
    references: Iterable[str] = (),
    store_dir: str = STORE_DIR,
    *,
    self_reference: bool = False,
) -> str:
    """The path of content-addressed data (``makeFixedOutputPathFromCA``).

    ``method`` is ``nar`` (recursive), ``flat``, ``text`` or ``git``. NAR-hashed sha256 and
    git content is a ``source`` path, text a ``text`` path (both may have references);
    anything else is ``output:out`` over ``fixed:out:<method prefix><algo>:<hex>:``.
    """
    refs = list(references)
    if method == "text":
        if algo != "sha256":
            raise ValueError("text content addressing requires sha256")
        if self_reference:
            raise ValueError("text content cannot refer to itself")
        return make_store_path(_make_type("text", refs), digest, name, store_dir)
    if method == "git" or (method == "nar" and algo == "sha256"):
        return make_store_path(
            _make_type("source", refs, self_reference), digest, name, store_dir, inner_algo=algo
        )
    if method not in ("nar", "flat"):
        raise ValueError(f"unknown content-addressing method {method!r}")
    if refs or self_reference:
        raise ValueError("fixed outputs other than nar/sha256 cannot have references")
    prefix = "r:" if method == "nar" else ""
    inner = hashlib.sha256(f"fixed:out:{prefix}{algo}:{digest.hex()}:".encode()).digest()
    return make_store_path("output:out", inner, name, store_dir)


def output_path_name(drv_name: str, output: str) -> str:
    """The name of an output's store path: ``drv_name`` or ``drv_name-output``."""
    return drv_name if output == "out" else f"{drv_name}-{output}"


def make_output_path(
    output: str, drv_hash: bytes, drv_name: str, store_dir: str = STORE_DIR
) -> str:
    """An input-addressed output path (``makeOutputPath``) from hashDerivationModulo."""
    return make_store_path(
        f"output:{output}", drv_hash, output_path_name(drv_name, output), store_dir
    )


def hash_placeholder(output: str) -> str:
    """The placeholder for a derivation's own output (``hashPlaceholder``)."""
    digest = hashlib.sha256(f"nix-output:{output}".encode()).digest()
    return "/" + nixbase32.encode(digest)


@functools.lru_cache(maxsize=1 << 16)
def upstream_placeholder(drv_path: str, output: str) -> str:
    """The placeholder for an output of a CA input derivation (``unknownCaOutput``)."""
    base = basename(drv_path)
    if not base.endswith(".drv") or len(base) < HASH_CHARS + 1 + 4:
        raise ParseError("derivation path", f"{drv_path!r} is not a .drv path")
    drv_name = base[HASH_CHARS + 1 : -4]
    clear = f"nix-upstream-output:{base[:HASH_CHARS]}:{output_path_name(drv_name, output)}"
    return "/" + nixbase32.encode(hashlib.sha256(clear.encode()).digest())


def is_store_path(path: str, store_dir: str = STORE_DIR) -> bool:
    """Whether :func:`parse_store_path` accepts ``path`` (in the default store, usually
    one regular expression)."""
    if store_dir == STORE_DIR and _DEFAULT_STORE_PATH_RE.fullmatch(path):
        return True
    try:
        parse_store_path(path, store_dir)
    except ParseError:
        return False
    return True


def parse_store_path(path: str, store_dir: str = STORE_DIR) -> tuple[str, str]:
    """Split a store path into ``(hash_part, name)``; ParseError if it is not one."""
    what = "store path"
    prefix = store_dir + "/"
    if not path.startswith(prefix):
        raise ParseError(what, f"{path!r} is not in {store_dir}", 0)
    base = path[len(prefix) :]
    offset = len(prefix)
    if "/" in base:
        raise ParseError(what, f"{path!r} is not directly in {store_dir}", offset + base.index("/"))
    if len(base) < HASH_CHARS + 2 or base[HASH_CHARS] != "-":
        raise ParseError(what, f"{path!r} has no '<hash>-<name>' base name", offset)
    hash_part, name = base[:HASH_CHARS], base[HASH_CHARS + 1 :]
    if not _HASH_RE.fullmatch(hash_part):
        for i, c in enumerate(hash_part):
            if c not in nixbase32.ALPHABET:
                raise ParseError(
                    what, f"hash part of {path!r} has invalid character {c!r}", offset + i
                )
    try:
        check_name(name)
    except ParseError as e:
        pos = offset + HASH_CHARS + 1 + (e.position or 0)
        raise ParseError(what, e.message, pos) from None
    return hash_part, name


def basename(path: str) -> str:
    """The last component of a path (``<hash>-<name>`` for a store path)."""
    return path.rsplit("/", 1)[-1]


def hash_part(path: str) -> str:
    """The 32-character hash part of a store path (not validated; see parse_store_path)."""
    return basename(path)[:HASH_CHARS]


def path_name(path: str) -> str:
    """The name part of a store path (not validated; see parse_store_path)."""
    return basename(path)[HASH_CHARS + 1 :]
