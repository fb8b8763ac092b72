"""``tracehook keygen`` and Nix's key files are interchangeable, both ways, with real Nix."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nixharness import NixEnv
from tracehook import cli
from tracehook.nix.nar import format_nar_hash, parse_nar_hash
from tracehook.stores.nixdb import StoreDatabase
from tracehook.trace import crypto

pytestmark = pytest.mark.nix


def fingerprint(env: NixEnv, path: str) -> tuple[str, tuple[str, ...]]:
    """The narinfo fingerprint of a built path, and the signatures Nix recorded for it."""
    with StoreDatabase(str(env.root)) as db:
        info = db.path_info(path)
    assert info is not None and info.nar_size
    nar = format_nar_hash(parse_nar_hash(info.nar_hash))
    fp = f"1;{path};{nar};{info.nar_size};{','.join(info.references)}"
    return fp, info.sigs


def test_nix_signs_with_our_key(nixenv: NixEnv, tmp_path: Path) -> None:
    sec, pub = tmp_path / "ours.sec", tmp_path / "ours.pub"
    assert cli.main(["keygen", "ours-1", "--secret-key-file", str(sec),
                     "--public-key-file", str(pub)]) == 0
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
    nixenv.configure(secret_key_files=str(sec))
    (out,) = nixenv.build("iaA", salt="keygen").out_paths
    fp, sigs = fingerprint(nixenv, out)
    (sig,) = [s for s in sigs if s.startswith("ours-1:")]
    pk = crypto.read_public_key_file(pub)
    assert crypto.nix_verify({pk.name: pk}, fp, sig) == pk
    if nixenv.tier.name == "2.26":  # Nix itself accepts our public key file's text
        ok = nixenv.run("nix", "store", "verify", "--no-contents", "--sigs-needed", "1",
                        "--trusted-public-keys", pub.read_text().strip(), out, check=False)
        assert ok.returncode == 0, ok.stderr
        other = crypto.format_public_key(crypto.generate_secret_key("ours-1").public)
        bad = nixenv.run("nix", "store", "verify", "--no-contents", "--sigs-needed", "1",
                         "--trusted-public-keys", other, out, check=False)
        assert bad.returncode != 0


def test_we_read_and_sign_with_nix_keys(nixenv: NixEnv, tmp_path: Path) -> None:
    sec, pub = tmp_path / "nix.sec", tmp_path / "nix.pub"
    nixenv.run("nix-store", "--generate-binary-cache-key", "nixmade-1", str(sec), str(pub))
    sk = crypto.read_secret_key_file(sec)
    pk = crypto.read_public_key_file(pub)
    assert sk.public == pk
    assert crypto.format_secret_key(sk) == sec.read_text().strip()
    assert crypto.format_public_key(pk) == pub.read_text().strip()
    # Nix signs with its key; we verify with its public key file.
    nixenv.configure(secret_key_files=str(sec))
    (out,) = nixenv.build("iaB", salt="keygen2").out_paths
    fp, sigs = fingerprint(nixenv, out)
    (sig,) = [s for s in sigs if s.startswith("nixmade-1:")]
    assert crypto.nix_verify({pk.name: pk}, fp, sig) == pk
    # We sign with Nix's secret key: byte-identical to Nix's own (Ed25519 is deterministic).
    assert crypto.nix_sign(sk, fp) == sig


def test_keygen_refuses_overwrite_and_bad_names(tmp_path: Path) -> None:
    sec, pub = tmp_path / "k.sec", tmp_path / "k.pub"
    args = ["--secret-key-file", str(sec), "--public-key-file", str(pub)]
    assert cli.main(["keygen", "k", *args]) == 0
    before = sec.read_bytes()
    assert cli.main(["keygen", "k", *args]) == 2
    assert sec.read_bytes() == before
    assert cli.main(["keygen", "bad:name", "--secret-key-file", str(tmp_path / "x"),
                     "--public-key-file", str(tmp_path / "y")]) == 2
    assert cli.main(["keygen", "", "--secret-key-file", str(tmp_path / "x"),
                     "--public-key-file", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists()
