"""Which Nix built a step, for the trace's builder block (issue 12, item 12: "unknown")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tracehook.signer import nixversion


def named(*rows: tuple[object, ...]) -> list[Any]:
    return [pytest.param(*row, id=str(row[0])) for row in rows]


@pytest.mark.parametrize(
    ("case", "exe", "expected"),
    named(
        ("nix in store", "/nix/store/" + "a" * 32 + "-nix-2.26.3/bin/nix", ("nix", "2.26.3")),
        ("lix in store", "/nix/store/" + "b" * 32 + "-lix-2.91.1/bin/nix", ("lix", "2.91.1")),
        ("debian", "/usr/bin/nix", None),
        ("not nix", "/nix/store/" + "c" * 32 + "-bash-5.2/bin/bash", None),
    ),
)
def test_from_store_path(case: str, exe: str, expected: tuple[str, str] | None) -> None:
    assert nixversion.from_store_path(exe) == expected


@pytest.mark.parametrize(
    ("case", "text", "expected"),
    named(
        ("nix", "nix (Nix) 2.26.3\n", ("nix", "2.26.3")),
        ("old nix", "nix (Nix) 2.8.0\n", ("nix", "2.8.0")),
        ("lix", "nix (Lix, like Nix) 2.91.1\nSystem type: x86_64-linux\n", ("lix", "2.91.1")),
        ("the dynamic loader", "ld.so (Debian GLIBC 2.41-6) stable release version 2.41.\n",
         None),
        ("empty", "", None),
    ),
)
def test_parse_version_output(case: str, text: str, expected: tuple[str, str] | None) -> None:
    assert nixversion.parse_version_output(text) == expected


def fake_nix(directory: Path, output: str) -> Path:
    """A ``nix`` on PATH that prints ``output`` for --version and counts its runs."""
    directory.mkdir(parents=True, exist_ok=True)
    nix = directory / "nix"
    nix.write_text(f"#!/bin/sh\necho run >> {directory}/runs\nprintf '%s\\n' '{output}'\n")
    nix.chmod(0o755)
    return nix


def runs(directory: Path) -> int:
    path = directory / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_nix_on_path_asked_once_then_remembered(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    fake_nix(bindir, "nix (Nix) 2.99.1")
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    cache_file = tmp_path / "nix-version.json"
    for _ in range(3):  # three hook processes: each has a fresh in-memory cache
        cache = nixversion.VersionCache(cache_file)
        assert nixversion.detect(None, None, None, env, cache) == ("nix", "2.99.1")
    assert runs(bindir) == 1
    # A new Nix at the same path (an upgrade) is asked again.
    fake_nix(bindir, "nix (Nix) 2.99.2 ")
    os.utime(bindir / "nix", ns=(1, 1))
    cache = nixversion.VersionCache(cache_file)
    assert nixversion.detect(None, None, None, env, cache) == ("nix", "2.99.2")
    assert runs(bindir) == 2


def test_configured_values_win_and_skip_detection(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    fake_nix(bindir, "nix (Nix) 2.99.1")
    env = {"PATH": str(bindir)}
    cache = nixversion.VersionCache()
    assert nixversion.detect("lix", "2.91.1", os.getpid(), env, cache) == ("lix", "2.91.1")
    assert runs(bindir) == 0
    assert nixversion.detect("lix", None, None, env, cache) == ("lix", "2.99.1")


@pytest.mark.parametrize(
    ("case", "output"),
    named(("not a nix", "hello 1.0"), ("fails", "")),
)
def test_unknown_when_nothing_answers(case: str, output: str, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    nix = fake_nix(bindir, output)
    if case == "fails":
        nix.write_text("#!/bin/sh\nexit 1\n")
    cache = nixversion.VersionCache(tmp_path / "cache.json")
    env = {"PATH": str(bindir)}
    assert nixversion.detect(None, None, None, env, cache) == nixversion.UNKNOWN
    assert nixversion.detect(None, None, None, {"PATH": str(tmp_path / "none")},
                             cache) == nixversion.UNKNOWN


def test_parent_pid_and_exe() -> None:
    assert nixversion.parent_pid(os.getpid()) == os.getppid()
    assert nixversion.parent_pid(2**22 + 12345) is None
    assert nixversion.process_exe(os.getpid()) == os.path.realpath("/proc/self/exe")


def test_unwritable_cache_file_is_harmless(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    fake_nix(bindir, "nix (Nix) 2.99.1")
    cache = nixversion.VersionCache(tmp_path / "missing-dir" / "cache.json")
    env = {"PATH": str(bindir)}
    assert nixversion.detect(None, None, None, env, cache) == ("nix", "2.99.1")
    assert nixversion.detect(None, None, None, env, cache) == ("nix", "2.99.1")
    assert runs(bindir) == 1  # remembered in memory
