"""The test suite's keys, in one place, so that a name means the same key in every test.

``builderA`` and ``builderB`` are laut's published test keys (vendored with laut's
conformance data in tests/data/laut-v2, see its README.md for provenance and licence):
traces signed with them verify beside laut's own. Any other name gets a fixed key derived
from the name (deterministic, never a real secret), so golden outputs stay stable.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from tracehook.trace import crypto

# laut's v2 conformance data, vendored: the .drv store, the traces, the test keys.
CONFORMANCE = Path(__file__).resolve().parent / "data" / "laut-v2"
KEYS = CONFORMANCE / "keys"
LAUT_KEYS = ("builderA", "builderB")
# the target whose whole chain both of laut's builders signed (tests and benchmarks verify it)
STAGE1 = "/nix/store/cjpxbf5h30808h53lckfyvzacsvfs08q-bootstrap-stage1-stdenv-linux.drv"


@cache
def secret(name: str) -> crypto.SecretKey:
    """The test key called ``name``: laut's for builderA / builderB, else a fixed one."""
    if name in LAUT_KEYS:
        return crypto.read_secret_key_file(KEYS / f"{name}_key.private")
    seed = (name.encode() * 32)[:32]
    return crypto.SecretKey(name, seed)


def public(name: str) -> crypto.PublicKey:
    return secret(name).public


def public_text(name: str) -> str:
    """The public key in Nix's text format (``name:base64``), as a policy file holds it."""
    return crypto.format_public_key(public(name))


def secret_file(name: str, directory: Path) -> Path:
    """Write the secret key ``name`` to ``directory/name.secret`` (Nix's format)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.secret"
    path.write_text(crypto.format_secret_key(secret(name)) + "\n")
    path.chmod(0o600)
    return path
