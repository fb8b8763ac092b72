"""Generate docs/FORMAT.md's test vectors: ``python tests/vectors/generate.py [--check]``.

Every vector is computed from fixed inputs and builderA's published test key (laut's
``testkeys/builderA_key.private``, vendored with laut's conformance data in
tests/data/laut-v2/keys; see the README.md there for provenance and licence). Ed25519 is
deterministic, so the output is stable byte for byte; ``tests/test_vectors.py``
regenerates it and compares with the committed file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tracehook.nix import nixbase32
from tracehook.trace import crypto, jws
from tracehook.trace.claim import (
    BuilderInfo,
    OutputClaim,
    TraceKey,
    ia_preimage,
    make_payload,
    sign_trace,
    trace_key,
)

HERE = Path(__file__).resolve().parent
OUT = HERE / "traces.json"
LAUT_DATA = HERE.parent / "data" / "laut-v2"
KEY_FILE = "keys/builderA_key.private"


def _h(text: str) -> bytes:
    """A NAR hash for the vectors, given in nix32 as Nix prints it."""
    return nixbase32.decode(text)


BUILDER = BuilderInfo(1618858745, "/nix/store", "nix", "2.28.3")

CASES: list[dict[str, Any]] = [
    {
        "name": "ca: laut stage0 binutils-wrapper (same fields as laut's builderA trace)",
        "rdrv_path": (
            "/nix/store/286wqgdqv715j8yrca9lkzhyk9j3s9a8-bootstrap-stage0-binutils-wrapper-.drv"
        ),
        "floating_ca": True,
        "pins": {},
        "drv_name": "bootstrap-stage0-binutils-wrapper-",
        "outputs": {
            "out": (
                "/nix/store/j87rlazyfsgd5xg9ppz1jhmagxbk46mn-bootstrap-stage0-binutils-wrapper-",
                "0panr44pbv26jisifrnkrqxvdy3hdlw3vh63lxlapxlx87d3xrlj",
            )
        },
    },
    {
        "name": "ia: input-addressed step pinning two input-addressed inputs",
        "rdrv_path": "/nix/store/0c3sp1a92y4mh1l0g1k7d0xqv7wb8m2z-ia-c.drv",
        "floating_ca": False,
        "pins": {
            "/nix/store/f0rry7xy2zc0zq4kpbsf4rdfy9d7jf5r-ia-b":
                "0mqd3xnbrwy45mqvs5s0xhs0v5zn2x7hzsbjh8nms4szspd0dbxp",
            "/nix/store/70zb8ay0fx91sfxnf6iz98wdjbqi1l2l-ia-a":
                "1d14c6jpgyv3k3m0sgf8dnbs3l3j5ghwc3vwl9ahbq3ifc6j7pmq",
        },
        "drv_name": "ia-c",
        "outputs": {
            "out": (
                "/nix/store/aa8ikhiac1834kaka8vnw5xbxs09472r-ia-c",
                "0lbnnzk9p4l1wcs2nqc19ahqjz7bh21ig9pbpxd9hdm7rxg6dw34",
            )
        },
    },
    {
        "name": "ia: floating-CA step with an input-addressed input, two outputs",
        "rdrv_path": "/nix/store/q5x3icxaibn3ps3cqff320kq11i3g8zk-use-multi.drv",
        "floating_ca": True,
        "pins": {
            "/nix/store/xdkcsl1rdijfk10553vlc9dl02z1vjwv-multi-ia-dev":
                "0j4nrbh1f2rxc4k4g5yy0qrpx1vh0x4l3ig9g3kfqbqyk15yl4ca",
        },
        "drv_name": "use-multi",
        "outputs": {
            "out": (
                "/nix/store/rfxjwxpd3s0wrp1x6jmd515b5vjn80h6-use-multi",
                "1x5cxqbhvsv2ij4x5ngb1m2d8l4qdkcd9xrd2y7vg8wyb6ndwmfh",
            ),
            "lib": (
                "/nix/store/zwrv7a4xypwc63iwqi0csy15vqa5j945-use-multi-lib",
                "0xx7b1fs1ywy2wibpx8x4xqmdz1wzbgw9wq0zl0q5h2d5nl3gmsy",
            ),
        },
    },
    {
        "name": "ia: input-addressed step with no input-addressed inputs (no pins)",
        "rdrv_path": "/nix/store/b1v5a76mqkyrwfzsc6yhbr1alc7vkli1-ia-on-ca.drv",
        "floating_ca": False,
        "pins": {},
        "drv_name": "ia-on-ca",
        "outputs": {
            "out": (
                "/nix/store/xjkkx945abh0qz4wplr6zbn42dxm58cg-ia-on-ca",
                "0a4v6fq3iz3g3bw4k0yc2x4m3c4f4m6f0f6c7lz8r4bbyq0kq9kq",
            )
        },
    },
]


def vector(case: dict[str, Any], sk: crypto.SecretKey) -> dict[str, Any]:
    pins = {p: _h(h) for p, h in case["pins"].items()}
    key: TraceKey = trace_key(case["rdrv_path"], case["floating_ca"], pins)
    outputs = {n: OutputClaim(p, _h(h)) for n, (p, h) in case["outputs"].items()}
    header = jws.laut_header(sk.name, sk.public, typ_jwt=True)
    payload = make_payload(key, outputs, BUILDER, case["drv_name"])
    token = sign_trace(sk, key, outputs, BUILDER, case["drv_name"])
    h64, p64, s64 = token.split(".")
    result: dict[str, Any] = {
        "name": case["name"],
        "given": {
            "rdrv_path": case["rdrv_path"],
            "floating_ca": case["floating_ca"],
            "pins": case["pins"],
            "drv_name": case["drv_name"],
            "outputs": {n: {"path": p, "nar_hash": f"sha256:{h}"}
                        for n, (p, h) in case["outputs"].items()},
            "builder": {"rebuild_id": BUILDER.rebuild_id, "store_root": BUILDER.store_root,
                        "nix_flavor": BUILDER.nix_flavor, "nix_version": BUILDER.nix_version},
        },
        "kind": key.kind,
        "key": key.key,
    }
    if key.kind == "ia":
        result["ia_preimage"] = ia_preimage(key.rdrv_path, pins).decode("utf-8")
    result |= {
        "header_json": jws.dumps_compact(header).decode("ascii"),
        "payload_json": jws.dumps_compact(payload).decode("ascii"),
        "signing_input": f"{h64}.{p64}",
        "signature_b64url": s64,
        "jws": token,
    }
    return result


def generate(data_dir: Path = LAUT_DATA) -> bytes:
    sk = crypto.read_secret_key_file(data_dir / KEY_FILE)
    doc = {
        "comment": "generated by tests/vectors/generate.py; do not edit (see docs/FORMAT.md)",
        "format": "laut v2 + tracehook-ia-v1",
        "secret_key_file": f"tests/data/laut-v2/{KEY_FILE}",
        "public_key": crypto.format_public_key(sk.public),
        "kid": jws.laut_kid(sk.name, sk.public),
        "vectors": [vector(c, sk) for c in CASES],
    }
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def main(argv: list[str]) -> int:
    data = generate()
    if "--check" in argv:
        same = OUT.exists() and OUT.read_bytes() == data
        print("up to date" if same else f"{OUT} differs: regenerate it", file=sys.stderr)
        return 0 if same else 1
    OUT.write_bytes(data)
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
