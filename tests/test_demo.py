"""The README's main job, run by the suite: ``tracehook demo``, with whichever supported Nix
is first on PATH (2.26 and 2.8, each in turn), and a one-line refusal of an older one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nixharness import NixTier
from tracehook.cli import main

pytestmark = pytest.mark.nix


def test_demo_end_to_end_with_the_nix_on_path(
    nix_tier: NixTier, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", f"{nix_tier.bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    monkeypatch.delenv("TRACEHOOK_NIX_2_26_BIN", raising=False)
    work = tmp_path / "demo"
    code = main(["demo", "--workdir", str(work)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"Nix {nix_tier.version} from {nix_tier.bindir}" in out
    assert "demo OK: verified chain substituted, tampered chain refused" in out
    assert "substituted /nix/store/" in out
    # The operator's view names the refused step and why.
    refusals = [line for line in out.splitlines() if "  gate  " in line and " refused " in line]
    assert refusals and all("demo-library" in line for line in refusals), out
    assert "bad signature" in refusals[0]
    # Every build step was signed once and published (4 steps: 3 CA, 1 input-addressed).
    assert len(list((work / "traces" / "traces").glob("[0-9a-z]*"))) == 4


def test_demo_says_which_nix_it_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old = tmp_path / "old-nix"
    old.mkdir()
    for prog, text in (("nix", "nix (Nix) 2.3.16"), ("nix-build", "")):
        (old / prog).write_text(f"#!/bin/sh\necho '{text}'\n")
        (old / prog).chmod(0o755)
    monkeypatch.setenv("PATH", f"{old}:/usr/bin:/bin")
    code = main(["demo", "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 3
    assert err.strip().splitlines() == [
        f"tracehook: error: the demo needs Nix 2.8 or newer; {old} has 2.3.16 (pass "
        "--nix-bin DIR, or run scripts/demo.sh)"]
    assert not (tmp_path / "w").exists()


def test_demo_without_nix(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("TRACEHOOK_NIX_2_26_BIN", raising=False)
    assert main(["demo", "--workdir", str(tmp_path / "w")]) == 3
    err = capsys.readouterr().err
    assert "no Nix found on PATH: pass --nix-bin DIR" in err and len(err.splitlines()) == 1


def test_demo_refuses_a_used_workdir(tmp_path: Path, nix226: NixTier,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "something").write_text("keep me")
    code = main(["demo", "--workdir", str(tmp_path), "--nix-bin", str(nix226.bindir)])
    assert code == 3
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "something").read_text() == "keep me"
