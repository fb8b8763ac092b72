"""The data model held against real Nix (2.26 and 2.8), never against itself.

For every derivation of the test library, built by real Nix in an isolated store:
the parsed .drv round-trips byte for byte and hashes to its own path, input-addressed
output paths and realisation ids equal what Nix recorded, resolved-derivation paths equal
the ones Nix printed, NAR hashes equal ``nix-store --query --hash``, and narinfo and
realisation signatures cross-verify between Nix and our crypto in both directions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import MakeNixEnv
from nixharness import BuildResult, NixEnv, NixTier
from tracehook.nix import nar, narinfo, realisation
from tracehook.nix.derivation import encode_drv, serialize
from tracehook.nix.derivation_hash import DrvHash, input_addressed_paths, realisation_ids
from tracehook.nix.resolve import resolve, resolved_aterm
from tracehook.nix.storepath import derivation_path
from tracehook.stores.nixstore import StoreReader
from tracehook.trace import crypto

pytestmark = pytest.mark.nix

ATTRS = ("caC", "iaC", "caOnFod", "useMulti", "iaOnCa", "weirdEnv", "fodFlat", "fodRec")


@dataclass(frozen=True)
class Built:
    env: NixEnv
    tops: dict[str, str]  # attr -> top-level .drv path
    reader: StoreReader
    result: BuildResult


def build_library(env: NixEnv) -> Built:
    res = env.build("all")
    tops = {attr: env.instantiate(attr) for attr in ATTRS}
    return Built(env, tops, StoreReader(str(env.root)), res)


@pytest.fixture
def built(nixenv: NixEnv) -> Built:
    """The whole library built once in a fresh store of the parametrized tier."""
    return build_library(nixenv)


def closure_drvs(reader: StoreReader, tops: dict[str, str]) -> set[str]:
    drvs: set[str] = set()
    for top in tops.values():
        drvs |= set(reader.load_closure(top))
    return drvs


def test_every_drv_round_trips_and_hashes_to_its_path(
    built: Built,
) -> None:
    env, tops, reader = built.env, built.tops, built.reader
    drvs = closure_drvs(reader, tops)
    assert len(drvs) == 14  # every attribute of tests/nix/derivations.nix
    for path in sorted(drvs):
        raw = env.real(path).read_bytes()
        drv = reader.read_derivation(path)
        assert encode_drv(serialize(drv)) == raw, path
        assert derivation_path(drv) == path


def test_weird_strings_survive(built: Built) -> None:
    env, tops, reader = built.env, built.tops, built.reader
    drv = reader.read_derivation(tops["weirdEnv"])
    assert drv.env["unicode"] == "ünïcödé ✓ 雪 — 🎉"
    assert "\r\n" in drv.env["quoted"] and '"quoted"' in drv.env["quoted"]
    assert drv.env["dollar"] == "${not-interpolated} $HOME"
    out = input_addressed_paths(drv, reader.read_derivation)["out"]
    assert env.real(out).read_text().startswith("a \"quoted\" word")


def test_input_addressed_paths_equal_nix(
    built: Built,
) -> None:
    tops, reader = built.tops, built.reader
    cache: dict[str, DrvHash] = {}
    checked = 0
    for path in sorted(closure_drvs(reader, tops)):
        drv = reader.read_derivation(path)
        if drv.kind != "input-addressed":
            continue
        ours = input_addressed_paths(drv, reader.read_derivation, cache)
        assert ours == {name: out.path for name, out in drv.outputs.items()}, path
        checked += 1
    assert checked >= 5


def test_realisation_ids_equal_what_nix_recorded(
    built: Built,
) -> None:
    env, tops, reader = built.env, built.tops, built.reader
    ca_drvs = [
        p for p in sorted(closure_drvs(reader, tops))
        if reader.read_derivation(p).kind == "floating-ca"
    ]
    assert len(ca_drvs) >= 6
    recorded = env.recorded_realisations(ca_drvs)
    cache: dict[str, DrvHash] = {}
    for path in ca_drvs:
        ids = realisation_ids(reader.read_derivation(path), reader.read_derivation, cache)
        for output, rid in ids.items():
            assert rid in recorded, f"{path}^{output}: {rid} not recorded by Nix"
            assert env.real(recorded[rid]).exists()


def test_resolved_paths_equal_what_nix_printed(
    built: Built,
) -> None:
    env, reader = built.env, built.reader
    printed: dict[str, str] = built.result.resolved
    # Nix resolves every CA (or deferred) derivation with floating-CA inputs, and also the
    # CA ones with only fixed-output inputs: caB, caC, caOnFod, useMulti, iaOnCa.
    assert len(printed) >= 4
    recorded = env.database_realisations() | env.recorded_realisations(list(printed))
    cache: dict[str, DrvHash] = {}
    for unresolved, expected in printed.items():
        drv = reader.read_derivation(unresolved)
        chosen: dict[tuple[str, str], str] = {}
        for in_path, outputs in drv.input_drvs.items():
            in_drv = reader.read_derivation(in_path)
            ids = realisation_ids(in_drv, reader.read_derivation, cache)
            for output in outputs:
                spec = in_drv.outputs[output]
                chosen[(in_path, output)] = spec.path or recorded[ids[output]]
        rdrv = resolve(drv, chosen)
        assert derivation_path(rdrv) == expected, unresolved
        # The verifier's shortcut (substitution in the ATerm as read) writes the same bytes.
        fast = resolved_aterm(drv, chosen)
        assert (fast is None) == (drv.kind == "deferred"), unresolved
        assert fast is None or fast[0] == serialize(rdrv), unresolved
        # The resolved .drv Nix wrote is byte for byte ours.
        assert env.real(expected).read_bytes() == encode_drv(serialize(rdrv))


def test_nar_hash_equals_nix(built: Built) -> None:
    env = built.env
    outs = built.result.out_paths
    assert outs
    for path in outs:
        digest, _size = nar.nar_hash(env.real(path))
        assert nar.format_nar_hash(digest) == env.query_hash(path)


def _copy_signed(env: NixEnv, key_file: Path, cache_dir: Path, paths: list[str]) -> None:
    env.run(
        "nix", "copy", "--to", f"file://{cache_dir}", *paths,
        "--option", "secret-key-files", str(key_file),
    )


def test_narinfo_and_realisation_signatures_cross_verify(
    nixenv: NixEnv, tmp_path: Path
) -> None:
    env = nixenv
    sk = crypto.generate_secret_key("test-cache-1")
    secret, public = tmp_path / "k.sec", tmp_path / "k.pub"
    crypto.write_key_files(sk, secret, public)
    keys = {sk.name: sk.public}
    # Nix signs paths and realisations as it registers them when secret-key-files is set.
    env.configure(secret_key_files=str(secret))
    built = build_library(env)
    cache_dir = tmp_path / "cache"
    paths = list(built.result.out_paths)
    ca_tops = [built.tops[a] + "^out" for a in ("caC", "caOnFod", "useMulti")]
    # nix copy uploads realisations only for the derivation outputs it is asked for; Nix
    # 2.8 cannot name those in a chroot store, so its realisations are read from its db.
    _copy_signed(env, secret, cache_dir, paths + (ca_tops if env.tier.name != "2.8" else []))
    infos = sorted(cache_dir.glob("*.narinfo"))
    assert len(infos) >= 6
    for info_file in infos:
        ni = narinfo.parse(info_file.read_text(), what=str(info_file))
        ours = [s for s in ni.sigs if s.startswith(sk.name + ":")]
        assert ours, f"Nix did not sign {ni.store_path}"
        for sig in ours:
            assert crypto.nix_verify(keys, narinfo.fingerprint(ni), sig) == sk.public
        # And Nix verifies a signature made by us: replace every Sig line with ours.
        ni_ours = narinfo.with_signature(
            narinfo.NarInfo(**{**ni.__dict__, "sigs": ()}),
            crypto.nix_sign(sk, narinfo.fingerprint(ni)),
        )
        info_file.write_text(narinfo.render(ni_ours))
    if env.tier.name == "2.8":
        reals = [
            realisation.Realisation(rid, path.removeprefix("/nix/store/"), sigs, {})
            for rid, (path, sigs) in env.database_realisation_records().items()
        ]
    else:
        reals = [
            realisation.parse_doi_v1(doi.read_bytes(), what=str(doi))
            for doi in cache_dir.glob("realisations/*.doi")
        ]
    assert len(reals) >= 3
    for r in reals:
        assert r.signatures, f"Nix did not sign realisation {r.id}"
        for sig in r.signatures:
            assert crypto.nix_verify(keys, realisation.fingerprint_v1(r), sig) == sk.public
    res = env.run(
        "nix", "store", "verify", "--store", f"file://{cache_dir}", "--sigs-needed", "1",
        "--no-contents", "--option", "trusted-public-keys", crypto.format_public_key(sk.public),
        *paths,
    )
    assert res.returncode == 0
    # A wrong signature is refused by Nix too (the check above is not vacuous).
    first = infos[0]
    ni = narinfo.parse(first.read_text())
    other = crypto.generate_secret_key(sk.name)  # same name, different key
    first.write_text(narinfo.render(narinfo.with_signature(
        narinfo.NarInfo(**{**ni.__dict__, "sigs": ()}),
        crypto.nix_sign(other, narinfo.fingerprint(ni)),
    )))
    bad = env.run(
        "nix", "store", "verify", "--store", f"file://{cache_dir}", "--sigs-needed", "1",
        "--no-contents", "--option", "trusted-public-keys", crypto.format_public_key(sk.public),
        ni.store_path, check=False,
    )
    assert bad.returncode != 0


def test_realisation_json_shape(nix226: NixTier, make_nixenv: MakeNixEnv) -> None:
    """Nix 2.26's ``realisation info`` JSON parses as a v1 realisation (2.8's CLI cannot
    name the outputs of a derivation in a chroot store, so this one is 2.26 only)."""
    built = build_library(make_nixenv(nix226))
    out = built.env.run(
        "nix", "realisation", "info", "--json", built.tops["caC"] + "^out"
    ).stdout
    (obj,) = json.loads(out)
    r = realisation.parse_doi_v1(json.dumps(obj))
    assert r.id.endswith("!out")
    assert "/nix/store/" + r.out_path in built.result.out_paths
