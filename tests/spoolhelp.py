"""Signed spool entries for tests (fixed keys, real JWS), shared by spool and publish tests."""

from __future__ import annotations

import hashlib

from testkeys import secret
from tracehook.nix.nar import format_nar_hash
from tracehook.stores.spool import SpoolEntry
from tracehook.trace import crypto
from tracehook.trace.claim import BuilderInfo, OutputClaim, TraceKey, sign_trace

SK = secret("test-signer-1")
OTHER = secret("test-signer-2")


def make_entry(
    n: int, sk: crypto.SecretKey = SK, rebuild_id: int = 1, out_byte: int = 0
) -> SpoolEntry:
    """A real signed claim for a made-up CA step ``n``."""
    key = ("0123456789abcdfghijklmnpqrsvwxyz"[n % 32] * 32)
    rdrv = f"/nix/store/{key}-step{n}.drv"
    digest = hashlib.sha256(bytes([n, out_byte])).digest()
    out = OutputClaim(f"/nix/store/{'1' * 31}{n % 10}-step{n}", digest)
    tk = TraceKey("ca", key, rdrv)
    token = sign_trace(sk, tk, {"out": out}, BuilderInfo(rebuild_id, "/nix/store", "nix", "t"),
                       f"step{n}")
    kid = f"{sk.name}:{crypto.thumbprint16(sk.public)}"
    outputs = {"out": {"path": out.path, "hash": format_nar_hash(out.nar_hash)}}
    return SpoolEntry("ca", key, kid, f"/nix/store/{'2' * 32}-step{n}.drv", outputs, token,
                      1000.0 + n, crypto.format_public_key(sk.public))
