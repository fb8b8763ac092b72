"""The README's main job, run by the suite: the same `tracehook demo`, with real Nix 2.26."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixharness import NixTier
from tracehook.cli import main

pytestmark = pytest.mark.nix


def test_demo_end_to_end(
    nix226: NixTier, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "demo"
    code = main(["demo", "--workdir", str(work), "--nix-bin", str(nix226.bindir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "demo OK: verified chain substituted, tampered chain refused" in out
    assert "substituted /nix/store/" in out
    # The operator's view names the refused step and why.
    refusals = [line for line in out.splitlines() if "  gate  " in line and " refused " in line]
    assert refusals and all("demo-library" in line for line in refusals)
    assert "bad signature" in refusals[0]
    # Every build step was signed once and published (4 steps: 3 CA, 1 input-addressed).
    assert len(list((work / "traces" / "traces").glob("[0-9a-z]*"))) == 4


def test_demo_refuses_a_used_workdir(tmp_path: Path, nix226: NixTier,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "something").write_text("keep me")
    code = main(["demo", "--workdir", str(tmp_path), "--nix-bin", str(nix226.bindir)])
    assert code == 3
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "something").read_text() == "keep me"
