"""verify/targets.py without Nix: which derivation an output path is verified through.

Hand-written .drv files in a chroot-style store; the store's database is a stand-in that
answers what Nix would have recorded (the real-Nix cases are in test_verify_consumer.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tracehook.errors import ConfigError
from tracehook.nix.derivation import Derivation, DerivationOutput, encode_drv, serialize
from tracehook.nix.derivation_hash import input_addressed_paths, realisation_ids
from tracehook.nix.storepath import derivation_path, hash_placeholder
from tracehook.stores.nixdb import PathInfo, StoreDatabase
from tracehook.stores.nixstore import StoreReader
from tracehook.verify.targets import output_target, parse_targets

OUT = "/nix/store/" + "1" * 32 + "-x"


def _ca(arg: str, name: str = "x") -> Derivation:
    return Derivation({"out": DerivationOutput("", "r:sha256", "")}, {}, (), "x86_64-linux",
                      "/bin/sh", ("-c", arg),
                      {"name": name, "builder": "/bin/sh", "system": "x86_64-linux",
                       "out": hash_placeholder("out")})


def _ia(arg: str) -> Derivation:
    env = {"name": "y", "builder": "/bin/sh", "system": "x86_64-linux"}
    blank = Derivation({"out": DerivationOutput("", "", "")}, {}, (), "x86_64-linux",
                       "/bin/sh", ("-c", arg), {**env, "out": ""})
    out = input_addressed_paths(blank)["out"]
    return Derivation({"out": DerivationOutput(out, "", "")}, {}, (), "x86_64-linux",
                      "/bin/sh", ("-c", arg), {**env, "out": out})


def _write(root: Path, drv: Derivation) -> str:
    path = derivation_path(drv)
    real = Path(str(root) + path)
    real.parent.mkdir(parents=True, exist_ok=True)
    real.write_bytes(encode_drv(serialize(drv)))
    return path


class FakeDatabase(StoreDatabase):
    def __init__(self, infos: dict[str, PathInfo],
                 realisations: dict[str, list[tuple[int, str, str]]],
                 derivers: dict[str, list[tuple[int, str, str]]]) -> None:
        super().__init__(None)
        self.infos, self.rows, self.derivers = infos, realisations, derivers

    def path_info(self, path: str) -> PathInfo | None:
        return self.infos.get(path)

    def realisations_of(self, out_path: str) -> list[tuple[int, str, str]]:
        return self.rows.get(out_path, [])

    def derivers_of(self, out_path: str) -> list[tuple[int, str, str]]:
        return self.derivers.get(out_path, [])


def _info(path: str, deriver: str | None) -> PathInfo:
    return PathInfo(path, "sha256:" + "0" * 64, 1, deriver, None, (), ())


def _row(rowid: int, drv: Derivation) -> tuple[int, str, str]:
    drv_hash, _, output = realisation_ids(drv)["out"].rpartition("!")
    return (rowid, drv_hash, output)


def test_two_originals_of_one_ca_path_the_later_one_wins(tmp_path: Path) -> None:
    """Early cutoff: two evaluations made the same CA output; the builder's resolved .drv
    (the recorded deriver) is not here."""
    older, newer, other_name = _ca("v1"), _ca("v2"), _ca("v1", name="not-x")
    paths = [_write(tmp_path, d) for d in (older, newer, other_name)]
    resolved = "/nix/store/" + "2" * 32 + "-x.drv"
    db = FakeDatabase({OUT: _info(OUT, resolved)},
                      {OUT: [_row(3, older), _row(7, newer), _row(9, other_name)]}, {})
    target = output_target(OUT, OUT, StoreReader(str(tmp_path)), db)
    assert (target.drv_path, target.outputs, target.path) == (paths[1], frozenset({"out"}), OUT)


def test_input_addressed_path_through_its_derivers(tmp_path: Path) -> None:
    drv = _ia("y")
    drv_path = _write(tmp_path, drv)
    out = drv.outputs["out"].path
    db = FakeDatabase({out: _info(out, drv_path)}, {}, {out: [(4, drv_path, "out")]})
    target = output_target(out, out, StoreReader(str(tmp_path)), db)
    assert target.drv_path == drv_path and target.outputs == frozenset({"out"})


@pytest.mark.parametrize(("name", "deriver", "rows", "message"), [
    ("deriver-absent", "/nix/store/" + "2" * 32 + "-x.drv", False,
     "its recorded deriver /nix/store/2222"),
    ("no-deriver", None, False, "no deriver is recorded for it; no realisation names it"),
    ("realisation-but-no-drv-here", "/nix/store/" + "2" * 32 + "-x.drv", True,
     "is not in this store)"),
])
def test_no_derivation_is_a_one_line_usage_error(
    name: str, deriver: str | None, rows: bool, message: str, tmp_path: Path
) -> None:
    (tmp_path / "nix" / "store").mkdir(parents=True)
    realisations = {OUT: [_row(1, _ca("elsewhere"))]} if rows else {}
    db = FakeDatabase({OUT: _info(OUT, deriver)}, realisations, {})
    with pytest.raises(ConfigError) as exc:
        output_target(OUT, OUT, StoreReader(str(tmp_path)), db)
    text = exc.value.diagnostics()
    assert message in text and "the store holds no derivation for this path" in text
    assert "\n" not in text and exc.value.exit_code == 2


@pytest.mark.parametrize(("spec", "message"), [
    ("hello", "is not a store path"),
    ("/nix/store/" + "1" * 32 + "-x^out", r"'\^outputs' goes after a \.drv path"),
])
def test_bad_target_specs(spec: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_targets([spec], StoreReader(str(tmp_path)), str(tmp_path))


def test_drv_targets_do_not_touch_the_database(tmp_path: Path) -> None:
    drv = "/nix/store/" + "1" * 32 + "-x.drv"
    [whole, some] = parse_targets([drv, f"{drv}^out,dev"], StoreReader(str(tmp_path)),
                                  str(tmp_path))  # no database here: never opened
    assert (whole.drv_path, whole.outputs) == (drv, None)
    assert some.outputs == frozenset({"out", "dev"})
