"""Build traces: what is signed, under which key (docs/FORMAT.md). No I/O.

Two kinds of trace key, both 32 nix-base32 characters, both the file name under
``<store>/traces/``:

- ``ca`` (laut v2, interoperable): a floating content-addressed derivation whose every input
  output is content-addressed. The key is the hash part of the resolved derivation's store
  path (laut's ``in.rdrv_aterm_ca``).
- ``ia`` (tracehook extension, ``tracehook-ia-v1``): any other built derivation (input-
  addressed outputs, or content-addressed ones built from an input-addressed input). Its
  resolution also fixes the NAR hash of every input output that is not content-addressed
  ("pins"); the key is the nix-base32 of the 20-byte XOR-folded sha256 of
  ``"tracehook-ia-v1\\n" + <resolved drv path> + "\\n" + "<path> sha256:<nix32>\\n" ...``
  over the pins sorted by path. The payload carries it as ``in.rdrv_ia``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tracehook.errors import ParseError
from tracehook.nix import nixbase32
from tracehook.nix.nar import format_nar_hash, parse_nar_hash
from tracehook.nix.storepath import STORE_DIR, compress_hash, hash_part, parse_store_path
from tracehook.trace import crypto, jws

IA_FORMAT = "tracehook-ia-v1"
KeyKind = Literal["ca", "ia"]


@dataclass(frozen=True)
class TraceKey:
    """Which trace file a build step's claims live in, and how that was derived."""

    kind: KeyKind
    key: str
    rdrv_path: str
    pins: tuple[tuple[str, bytes], ...] = ()  # (input output path, NAR sha256), sorted

    def preimage(self) -> bytes:
        return ia_preimage(self.rdrv_path, dict(self.pins)) if self.kind == "ia" else b""


@dataclass(frozen=True)
class OutputClaim:
    """What a claim says of one output. Two claims name the same value when path and NAR
    hash agree; ``references`` (the tracehook references extension, docs/FORMAT.md) is
    what the signer attests the output refers to, sorted full store paths, or None when
    the claim does not say (laut's own traces)."""

    path: str
    nar_hash: bytes  # sha256 digest of the output's NAR
    references: tuple[str, ...] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BuilderInfo:
    rebuild_id: int
    store_root: str
    nix_flavor: str
    nix_version: str


@dataclass(frozen=True)
class Claim:
    """One signer's claim: 'the resolved step ``key`` produced ``outputs``'. Unverified.

    ``compact`` is the JWS as transmitted; ``token`` is it parsed (kept from
    :func:`parse_claim`, or parsed again on first use when the claim came from a checker
    process as plain values)."""

    kind: KeyKind
    key: str
    outputs: dict[str, OutputClaim]
    kid: str
    compact: str

    @functools.cached_property
    def token(self) -> jws.Jws:
        return jws.parse_compact(self.compact, "trace")


#: A claim as plain values (for a pipe or the persistent cache): kind, key, kid, outputs.
PlainOutputs = tuple[tuple[str, str, bytes, tuple[str, ...] | None], ...]
PlainClaim = tuple[KeyKind, str, str, PlainOutputs]


def claim_to_plain(claim: Claim) -> PlainClaim:
    return (claim.kind, claim.key, claim.kid,
            tuple((n, o.path, o.nar_hash, o.references) for n, o in claim.outputs.items()))


def claim_from_plain(plain: PlainClaim, compact: str) -> Claim:
    kind, key, kid, outputs = plain
    return Claim(kind, key, {n: OutputClaim(p, h, r) for n, p, h, r in outputs}, kid, compact)


def ia_preimage(rdrv_path: str, pins: Mapping[str, bytes]) -> bytes:
    lines = [IA_FORMAT, rdrv_path]
    lines += [f"{p} {format_nar_hash(pins[p])}" for p in sorted(pins)]
    return ("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape")


def ia_key(rdrv_path: str, pins: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256(ia_preimage(rdrv_path, pins)).digest()
    return nixbase32.encode(compress_hash(digest, 20))


def trace_key(rdrv_path: str, floating_ca: bool, pins: Mapping[str, bytes]) -> TraceKey:
    """The key of a resolved step. ``pins`` are the non-content-addressed input outputs."""
    if floating_ca and not pins:
        return TraceKey("ca", hash_part(rdrv_path), rdrv_path)
    return TraceKey("ia", ia_key(rdrv_path, pins), rdrv_path, tuple(sorted(pins.items())))


def make_payload(
    key: TraceKey,
    outputs: Mapping[str, OutputClaim],
    builder: BuilderInfo,
    drv_name: str,
) -> dict[str, Any]:
    """The JWS payload, laut v2's shape (``in``, ``out.nix``, ``builder``)."""
    debug: dict[str, Any] = {"drv_name": drv_name, "rdrv_path": key.rdrv_path}
    inputs: dict[str, Any]
    if key.kind == "ca":
        inputs = {"rdrv_aterm_ca": key.key, "debug": debug}
    else:
        debug["pins"] = {p: format_nar_hash(h) for p, h in key.pins}
        inputs = {"rdrv_ia": key.key, "format": IA_FORMAT, "debug": debug}
    out: dict[str, dict[str, Any]] = {}
    for name, claim in sorted(outputs.items()):
        out[name] = {
            "hashAlgo": "sha256",
            "method": "nar",
            "path": claim.path,
            "hash": format_nar_hash(claim.nar_hash),
        }
        if claim.references is not None:
            out[name]["references"] = sorted(claim.references)
    return {
        "in": inputs,
        "out": {"nix": out},
        "builder": {
            "rebuild_id": builder.rebuild_id,
            "store_root": builder.store_root,
            "nix_flavor": builder.nix_flavor,
            "nix_version": builder.nix_version,
        },
    }


def sign_trace(
    sk: crypto.SecretKey,
    key: TraceKey,
    outputs: Mapping[str, OutputClaim],
    builder: BuilderInfo,
    drv_name: str,
) -> str:
    # laut always writes "typ":"JWT" (its JWT library adds it); so do we, for byte-level parity.
    header = jws.laut_header(sk.name, sk.public, typ_jwt=True)
    return jws.sign_compact(sk, header, make_payload(key, outputs, builder, drv_name))


def _obj(value: Any, what: str, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ParseError(what, f"'{field}' is not an object")
    return value


def _output_claim(name: str, raw: Any, what: str, store_dir: str) -> OutputClaim:
    entry = _obj(raw, what, f"out.nix.{name}")
    path, digest = entry.get("path"), entry.get("hash")
    if not isinstance(path, str) or not isinstance(digest, str):
        raise ParseError(what, f"out.nix.{name} needs string 'path' and 'hash'")
    parse_store_path(path, store_dir)
    algo, method = entry.get("hashAlgo"), entry.get("method")
    # builderA (Nix): hashAlgo "sha256" + method "nar"; builderB (Lix): hashAlgo "r:sha256"
    if algo not in (None, "sha256", "r:sha256") or method not in (None, "nar"):
        raise ParseError(what, f"out.nix.{name}: unsupported hashAlgo {algo!r}/{method!r}")
    refs = entry.get("references")
    references: tuple[str, ...] | None = None
    if refs is not None:
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise ParseError(what, f"out.nix.{name}.references must be a list of store paths")
        for ref in refs:
            parse_store_path(ref, store_dir)
        references = tuple(sorted(set(refs)))
    return OutputClaim(path, parse_nar_hash(digest, f"{what} out.nix.{name}.hash"),
                       references)


def parse_claim(token: jws.Jws, what: str = "trace", store_dir: str = STORE_DIR) -> Claim:
    """Read the claim in a (not yet verified) JWS; ParseError if its payload is malformed."""
    kid = jws.kid_of(token)
    if kid is None:
        raise ParseError(what, "JWS header has no 'kid'")
    payload = token.payload
    inputs = _obj(payload.get("in"), what, "in")
    kind: KeyKind
    if isinstance(inputs.get("rdrv_ia"), str):
        kind, key = "ia", inputs["rdrv_ia"]
        if inputs.get("format", IA_FORMAT) != IA_FORMAT:
            raise ParseError(what, f"unknown input-addressed format {inputs.get('format')!r}")
    elif isinstance(inputs.get("rdrv_aterm_ca"), str):
        kind, key = "ca", inputs["rdrv_aterm_ca"]
    else:
        raise ParseError(what, "payload has neither in.rdrv_aterm_ca nor in.rdrv_ia")
    if not nixbase32.is_valid(key, 20):
        raise ParseError(what, f"trace key {key!r} is not 32 nix-base32 characters")
    out_nix = _obj(_obj(payload.get("out"), what, "out").get("nix"), what, "out.nix")
    if not out_nix:
        raise ParseError(what, "out.nix names no outputs")
    outputs = {n: _output_claim(n, v, what, store_dir) for n, v in out_nix.items()}
    claim = Claim(kind, key, outputs, kid, token.compact)
    claim.__dict__["token"] = token  # already parsed: seed the cached property
    return claim
