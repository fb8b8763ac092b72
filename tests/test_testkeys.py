"""One key helper for the whole suite: a name means the same key in every helper."""

from __future__ import annotations

from pathlib import Path

import gatekit
import spoolhelp
import testkeys
import verifyhelp
from tracehook.trace import crypto, jws


def test_builder_a_is_lauts_key_in_every_helper() -> None:
    laut = crypto.read_secret_key_file(testkeys.KEYS / "builderA_key.private")
    for helper in (gatekit.key, verifyhelp.secret, testkeys.secret):
        sk = helper("builderA")
        assert (sk.name, sk.seed, sk.public) == (laut.name, laut.seed, laut.public), helper
    assert jws.laut_kid("builderA", laut.public) == "builderA:bcda8d54470fea3b"
    assert testkeys.public_text("builderB") == verifyhelp.public_text("builderB") == (
        testkeys.KEYS / "builderB_key.public").read_text().strip()


def test_other_names_are_fixed_and_distinct() -> None:
    names = ("builderC", "cache-1", "gate-1", "test-signer-1", "test-signer-2")
    publics = {testkeys.public_text(n) for n in names}
    assert len(publics) == len(names)
    assert testkeys.secret("gate-1").seed == (b"gate-1" * 32)[:32]  # stable across runs
    assert testkeys.secret("test-signer-1") == spoolhelp.SK
    assert testkeys.secret("test-signer-2") == spoolhelp.OTHER


def test_secret_file_reads_back(tmp_path: Path) -> None:
    path = testkeys.secret_file("builderC", tmp_path)
    assert crypto.read_secret_key_file(path) == testkeys.secret("builderC")
    assert path.stat().st_mode & 0o077 == 0
