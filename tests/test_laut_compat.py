"""Our signer's trace for laut's stage0 target matches laut's own (conformance data)."""

from __future__ import annotations

from pathlib import Path

from tracehook.signer import examine
from tracehook.stores.nixstore import StoreReader
from tracehook.trace import crypto, jws
from tracehook.trace.claim import BuilderInfo, parse_claim
from tracehook.trace.stepkey import InputOutput, step_key

TARGET = "/nix/store/6a4wpppqvmf5dwr49gfm3hrxhd58hg0w-bootstrap-stage0-binutils-wrapper-.drv"
RESOLVED = "286wqgdqv715j8yrca9lkzhyk9j3s9a8"


def laut_traces(conformance: Path, key: str) -> list[jws.Jws]:
    data = (conformance / "traces" / key).read_bytes()
    return [jws.parse_compact(s) for s in jws.parse_trace_file(data)]


def outputs_of(reader: StoreReader, conformance: Path, drv_path: str) -> dict[str, str]:
    """What a step produced: FODs from their ATerm, CA steps from laut's builderA trace."""
    drv = reader.read_derivation(drv_path)
    if drv.kind == "fixed":
        return {n: o.path for n, o in drv.outputs.items()}
    inputs = {
        (p, o): InputOutput(outputs_of(reader, conformance, p)[o], True)
        for p, outs in drv.input_drvs.items()
        for o in outs
    }
    key = step_key(drv, inputs).key.key
    (claim,) = [
        parse_claim(t) for t in laut_traces(conformance, key)
        if jws.kid_of(t) == "builderA:bcda8d54470fea3b"
    ]
    return {n: c.path for n, c in claim.outputs.items()}


def test_our_trace_matches_lauts(conformance: Path) -> None:
    reader = StoreReader(str(conformance / "store"))
    drv = reader.read_derivation(TARGET)
    inputs = {
        (p, o): InputOutput(outputs_of(reader, conformance, p)[o], True)
        for p, outs in drv.input_drvs.items()
        for o in outs
    }
    resolution = step_key(drv, inputs)
    assert (resolution.key.kind, resolution.key.key) == ("ca", RESOLVED)

    (laut,) = [t for t in laut_traces(conformance, RESOLVED) if "builderA" in t.header["kid"]]
    laut_claim = parse_claim(laut)
    b = laut.payload["builder"]
    builder = BuilderInfo(b["rebuild_id"], b["store_root"], b["nix_flavor"], b["nix_version"])
    step = examine.BuildStep(TARGET, drv, resolution, laut_claim.outputs)
    sk = crypto.read_secret_key_file(conformance / "keys" / "builderA_key.private")
    ours = jws.parse_compact(examine.sign(step, sk, builder))

    pk = crypto.read_public_key_file(conformance / "keys" / "builderA_key.public")
    jws.verify(ours, pk)
    jws.verify(laut, pk)
    assert ours.header == laut.header  # same kid, same fields
    assert ours.signing_input.split(b".")[0] == laut.signing_input.split(b".")[0]  # same bytes
    # laut's payload shape: in.rdrv_aterm_ca, out.nix.<output>, builder; identical fields.
    assert list(ours.payload) == ["in", "out", "builder"]
    assert ours.payload["in"]["rdrv_aterm_ca"] == laut.payload["in"]["rdrv_aterm_ca"]
    assert ours.payload["in"]["debug"]["rdrv_path"] == laut.payload["in"]["debug"]["rdrv_path"]
    assert ours.payload["in"]["debug"]["drv_name"] == laut.payload["in"]["debug"]["drv_name"]
    assert ours.payload["out"]["nix"] == laut.payload["out"]["nix"]
    assert ours.payload["builder"] == laut.payload["builder"]
    ours_claim = parse_claim(ours)
    assert (ours_claim.kind, ours_claim.key, ours_claim.kid) == (
        laut_claim.kind, laut_claim.key, laut_claim.kid
    )
    assert ours_claim.outputs == laut_claim.outputs


def test_references_extension_is_ignored_by_a_laut_shaped_reader() -> None:
    """A claim with the references extension is still what laut reads: out.nix.<o> has
    path, hash, hashAlgo and method as laut writes them; the extra field is only extra."""
    import base64
    import json

    from tracehook.trace.claim import BuilderInfo, OutputClaim, TraceKey, sign_trace

    key = TraceKey("ca", "0" * 31 + "1", "/nix/store/" + "0" * 31 + "1-x.drv")
    ref = "/nix/store/" + "d" * 32 + "-dep"
    out = OutputClaim("/nix/store/" + "a" * 32 + "-x", b"\1" * 32, (ref,))
    token = sign_trace(crypto.SecretKey("builderA", b"\2" * 32), key, {"out": out},
                       BuilderInfo(1, "/nix/store", "nix", "2.26.3"), "x")
    payload = token.split(".")[1]
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    entry = body["out"]["nix"]["out"]
    assert {k: entry[k] for k in ("hashAlgo", "method", "path")} == {
        "hashAlgo": "sha256", "method": "nar", "path": out.path}
    assert entry["hash"].startswith("sha256:") and entry["references"] == [ref]
    claim = parse_claim(jws.parse_compact(token))
    assert claim.outputs["out"].references == (ref,)
    assert claim.outputs["out"] == OutputClaim(out.path, out.nar_hash)  # same value either way
