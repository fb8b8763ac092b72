"""The derivation model against laut's v2 conformance data (vendored in tests/data/laut-v2).

Signatures are not checked here (the crypto module does that): payloads are only decoded to
read ``in.rdrv_aterm_ca`` and ``out.nix.<output>.path``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from testkeys import CONFORMANCE, STAGE1
from tracehook.nix.aterm import parse
from tracehook.nix.derivation import decode_drv, encode_drv, serialize
from tracehook.nix.resolve import resolve, resolved_aterm, resolved_key
from tracehook.nix.storepath import (
    STORE_DIR,
    derivation_path,
    hash_part,
    make_fixed_output_path,
    output_path_name,
    upstream_placeholder,
)
from tracehook.stores.nixstore import StoreReader

STORE_ROOT = CONFORMANCE / "store"
TRACES = CONFORMANCE / "traces"

BINUTILS = "/nix/store/6a4wpppqvmf5dwr49gfm3hrxhd58hg0w-bootstrap-stage0-binutils-wrapper-.drv"

@pytest.fixture(scope="module", autouse=True)
def _conformance_data_present() -> None:
    if not (STORE_ROOT.is_dir() and TRACES.is_dir()):
        pytest.fail(f"laut's conformance data is missing from {CONFORMANCE}")


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def payloads(key: str) -> list[dict[str, Any]]:
    """The decoded (unverified) payloads of every signature in a trace file."""
    doc = json.loads((TRACES / key).read_bytes())
    result = []
    for jws in doc["signatures"]:
        _header, payload, _sig = jws.split(".")
        result.append(json.loads(_b64url(payload)))
    return result


def all_trace_keys() -> list[str]:
    return sorted(p.name for p in TRACES.iterdir()) if TRACES.is_dir() else []


def all_drv_paths() -> list[str]:
    store = STORE_ROOT / STORE_DIR.lstrip("/")
    return sorted(f"{STORE_DIR}/{p.name}" for p in store.glob("*.drv")) if store.is_dir() else []


# ------------------------------------------------------------------ derivations


@pytest.mark.parametrize("path", all_drv_paths())
def test_every_drv_round_trips_and_hashes_to_its_path(path: str) -> None:
    data = (STORE_ROOT / path.lstrip("/")).read_bytes()
    drv = parse(decode_drv(data), what=path)
    assert encode_drv(serialize(drv)) == data
    assert derivation_path(drv) == path
    assert StoreReader(str(STORE_ROOT)).read_derivation(path) == drv


def test_fixed_output_paths_follow_from_their_hashes() -> None:
    reader = StoreReader(str(STORE_ROOT))
    fixed = 0
    for path in all_drv_paths():
        drv = reader.read_derivation(path)
        if drv.kind != "fixed":
            continue
        out = drv.outputs["out"]
        digest = bytes.fromhex(out.hash)
        name = output_path_name(drv.name, "out")
        assert make_fixed_output_path(out.method, out.algo, digest, name) == out.path
        fixed += 1
    assert fixed == 4  # busybox (nar), bootstrap-tools.tar.xz, config.guess, config.sub (flat)


def test_closure_of_stage1() -> None:
    closure = StoreReader(str(STORE_ROOT)).load_closure(STAGE1)
    assert set(closure) == set(all_drv_paths())
    kinds = sorted(d.kind for d in closure.values())
    assert kinds == ["fixed"] * 4 + ["floating-ca"] * 8


def test_placeholder_known_answer() -> None:
    drv = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv"
    expected = "/0c6rn30q4frawknapgwq386zq358m8r6msvywcvc89n6m5p2dgbz"
    assert upstream_placeholder(drv, "out") == expected


# ------------------------------------------------------------------------ traces


@pytest.mark.parametrize("key", all_trace_keys())
def test_trace_preimages_hash_to_their_keys(key: str) -> None:
    """Every signer's resolved ATerm (in.debug) parses, round-trips and hashes to the key."""
    for payload in payloads(key):
        assert payload["in"]["rdrv_aterm_ca"] == key
        debug = payload["in"]["debug"]
        preimage = debug["rdrv_aterm_ca_preimage"]
        drv = parse(preimage, what=f"preimage in trace {key}")
        assert serialize(drv) == preimage
        assert drv.input_drvs == {}
        path = derivation_path(drv, name=debug["drv_name"])
        assert path == debug["rdrv_path"] == debug["rdrv_computed_path"]
        assert hash_part(path) == key


@dataclass
class Walk:
    """Bottom-up resolution of a closure, taking input outputs from the traces."""

    reader: StoreReader
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    def chosen(self, drv_path: str) -> dict[tuple[str, str], str]:
        drv = self.reader.read_derivation(drv_path)
        return {
            (inp, out): self.outputs_of(inp)[out]
            for inp, names in drv.input_drvs.items()
            for out in names
        }

    def outputs_of(self, drv_path: str) -> dict[str, str]:
        if drv_path in self.outputs:
            return self.outputs[drv_path]
        # Explicit post-order walk (no recursion) over the inputs.
        stack = [drv_path]
        while stack:
            path = stack[-1]
            drv = self.reader.read_derivation(path)
            pending = [p for p in drv.input_drvs if p not in self.outputs]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if path in self.outputs:
                continue
            if drv.kind == "fixed":
                self.outputs[path] = {name: o.path for name, o in drv.outputs.items()}
                continue
            chosen = self.chosen(path)
            key = resolved_key(drv, chosen)
            self.keys[path] = key
            long_way = serialize(resolve(drv, chosen))
            fast = resolved_aterm(drv, chosen)  # the verifier's shortcut: the same bytes
            assert fast is not None and fast[0] == long_way, path
            assert drv.aterm == serialize(drv), path  # seeded from the file as read
            self.outputs[path] = self._claimed_outputs(key, long_way)
        return self.outputs[drv_path]

    def _claimed_outputs(self, key: str, resolved_aterm: str) -> dict[str, str]:
        assert (TRACES / key).exists(), f"no trace for resolved key {key}"
        claims = []
        for payload in payloads(key):
            # What the signer says it built is byte for byte what we resolved.
            assert payload["in"]["debug"]["rdrv_aterm_ca_preimage"] == resolved_aterm
            claims.append({name: o["path"] for name, o in payload["out"]["nix"].items()})
        assert claims and all(c == claims[0] for c in claims), f"signers disagree on {key}"
        return claims[0]


@pytest.mark.parametrize(
    ("target", "expected_key", "expected_out"),
    [
        pytest.param(
            BINUTILS,
            "286wqgdqv715j8yrca9lkzhyk9j3s9a8",
            "/nix/store/j87rlazyfsgd5xg9ppz1jhmagxbk46mn-bootstrap-stage0-binutils-wrapper-",
            id="stage0-binutils-wrapper",
        ),
        pytest.param(
            STAGE1,
            "mdw7ghk4133r650ali5jdmgqi4ccwp65",
            "/nix/store/46f69c5mdfn57k6vmfzlwg23c3dzr1md-bootstrap-stage1-stdenv-linux",
            id="stage1-stdenv",
        ),
    ],
)
def test_resolving_targets_gives_the_signed_keys(
    target: str, expected_key: str, expected_out: str
) -> None:
    walk = Walk(StoreReader(str(STORE_ROOT)))
    assert walk.outputs_of(target) == {"out": expected_out}
    assert walk.keys[target] == expected_key
    drv = walk.reader.read_derivation(target)
    assert resolved_key(drv, walk.chosen(target)) == expected_key
    # Every step of the chain resolves to a key laut's builders signed, byte for byte
    # (the two stage1 links gnu-config and update-autotools-hook included).
    assert all((TRACES / key).exists() for key in walk.keys.values())
