"""Regenerates tests/data/nixos-24.05-subset/tree.tar.xz: the files of a NixOS 24.05 tree
that the NixOS tests read, checked to evaluate exactly as the whole tree does.

    NIXPKGS_TREE=/path/to/whole/tree scripts/nixos-subset.sh [--output FILE] [--work DIR]

1. **Capture.** The test files that use a tree (``TEST_FILES``) run under
   ``strace -f -e trace=%file`` with ``NIXPKGS_TREE`` = the whole tree, Nix 2.26 and 2.8
   alike. Every path under the tree that a process names (opens, stats, reads as a link)
   is recorded; a directory opened as a directory (``builtins.readDir``, or a path copied
   into the store) is recorded as listed.
2. **Select.** Every recorded path that exists, with its parent directories: files with
   their contents and executable bit, directories, symbolic links; and every entry of a
   listed directory, so that ``readDir`` sees the same names and types (an entry that
   nothing else touched is kept as an empty directory, or with its contents if a file),
   and the tree's COPYING.
3. **Write.** A tar of those, under ``tree/``, in name order, with a fixed time, owner
   root and modes 0644/0755/0777, compressed with xz -9e: the same tree gives the same bytes.
4. **Check.** The tarball is extracted; the batch evaluation, the type errors, the VM test,
   the flake's checks and eval-module.nix are evaluated against the whole tree and against
   the subset (each in a fresh store at the same place) and must render the same (the
   tree's own location aside); then ``TEST_FILES`` run against the subset and must pass.
   Only then is the tarball moved into place. Nothing here runs in the test suite: it needs
   the whole tree, which CI machines do not have.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nixharness import REPO, NixEnv, get_tier
from nixoseval import (
    SUBSET,
    SUBSET_TARBALL,
    TREE_ENV,
    evaluate_all,
    evaluate_type_errors,
    extract_subset,
    flake_check_facts,
    given_tree,
    module_scenarios,
    vm_test_facts,
)

TEST_FILES = ("tests/test_nixos_eval.py", "tests/test_nixos_whole.py", "tests/test_nix_files.py")
# Checks the tarball this script is about to write.
NOT_YET = "tests/test_nix_files.py::test_vendored_nixos_tree_is_small_and_licensed"
MTIME = 1719436366  # the snapshot's commit time (2024-06-26 21:12:46 UTC)
PREFIX = "tree"


def log(message: str) -> None:
    print(f"nixos-subset: {message}", file=sys.stderr, flush=True)


def run_tests(tree: Path, *, strace_log: Path | None = None) -> None:
    """``TEST_FILES`` against ``tree`` (under strace when ``strace_log`` is given)."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "--deselect", NOT_YET, *TEST_FILES]
    if strace_log is not None:
        strace = shutil.which("strace")
        if strace is None:
            raise SystemExit("nixos-subset: strace is not installed (apt-get install strace)")
        argv = [strace, "-f", "-qq", "-e", "trace=%file", "-e", "signal=none",
                "-o", str(strace_log), *argv]
    env = {**os.environ, TREE_ENV: str(tree)}
    res = subprocess.run(argv, cwd=REPO, env=env, check=False, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"nixos-subset: the tests failed against {tree} (exit "
                         f"{res.returncode})")


# ------------------------------------------------------------------ capture and select


@dataclass(frozen=True)
class Access:
    named: frozenset[str]  # paths relative to the tree ("" is its root)
    listed: frozenset[str]  # directories opened as directories


def read_strace(strace_log: Path, tree: Path) -> Access:
    quoted = re.compile(r'"(' + re.escape(str(tree)) + r'(?:/[^"]*)?)"')
    named: set[str] = set()
    listed: set[str] = set()
    with strace_log.open(errors="replace") as lines:
        for line in lines:
            for match in quoted.finditer(line):
                rel = os.path.relpath(os.path.normpath(match.group(1)), tree)
                rel = "" if rel == "." else rel
                if rel.startswith(".."):
                    continue
                named.add(rel)
                if "O_DIRECTORY" in line and ("openat(" in line or "open(" in line):
                    listed.add(rel)
    return Access(frozenset(named), frozenset(listed))


@dataclass(frozen=True)
class Member:
    rel: str
    kind: str  # "dir", "file" or "link"


def lkind(path: Path) -> str | None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else None


def select(tree: Path, access: Access) -> list[Member]:
    """What the subset holds: see the module docstring, step 2."""
    members: dict[str, str] = {}

    def add(rel: str) -> None:
        parts = rel.split("/") if rel else []
        for i in range(len(parts)):  # parents first; nothing below a link
            parent = "/".join(parts[:i])
            if parent and lkind(tree / parent) != "dir":
                return
        kind = lkind(tree / rel) if rel else "dir"
        if kind is None:
            return
        for i in range(1, len(parts)):
            members.setdefault("/".join(parts[:i]), "dir")
        if rel:
            members[rel] = kind

    for rel in sorted(access.named | {"COPYING"}):
        add(rel)
    for rel in sorted(access.listed):
        if lkind(tree / rel) == "dir":
            for entry in sorted(os.listdir(tree / rel)):
                add(f"{rel}/{entry}" if rel else entry)
    return [Member(rel, kind) for rel, kind in sorted(members.items())]


def write_tarball(tree: Path, members: Iterable[Member], out: Path) -> None:
    """Step 3 of the module docstring."""
    with lzma.open(out, "wb", preset=9 | lzma.PRESET_EXTREME) as xz, \
            tarfile.open(fileobj=xz, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member in members:
            path = tree / member.rel
            info = tarfile.TarInfo(f"{PREFIX}/{member.rel}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
            if member.kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            elif member.kind == "link":
                info.type, info.mode = tarfile.SYMTYPE, 0o777
                info.linkname = os.readlink(path)
                archive.addfile(info)
            else:
                info.size = path.stat().st_size
                info.mode = 0o755 if path.stat().st_mode & 0o100 else 0o644
                with path.open("rb") as f:
                    archive.addfile(info, f)


# ------------------------------------------------------------------ check


def remove(path: Path) -> None:
    """A throwaway store too: its directories are read-only."""
    def writable(func: Any, name: str, _exc: Any) -> None:
        os.chmod(os.path.dirname(name), 0o755)
        os.chmod(name, 0o755)
        func(name)

    if path.exists():
        shutil.rmtree(path, onerror=writable)


def rendered(tree: Path, base: Path) -> Any:
    """Everything the tests evaluate against a tree, with the tree's location replaced."""
    remove(base)
    env = NixEnv(get_tier("2.26"), base)
    out = {
        "batch": evaluate_all(tree, env),
        "type-errors": evaluate_type_errors(tree, env),
        "vm": vm_test_facts(tree, env),
        "flake": flake_check_facts(tree, env),
        "module": module_scenarios(tree, env),
    }
    remove(base)
    return json.loads(json.dumps(out).replace(str(tree), "@TREE@"))


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            found += differences(a[k], b[k], f"{where}/{k}")
        return found
    return [] if a == b else [f"{where}: {json.dumps(a)[:200]} != {json.dumps(b)[:200]}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=SUBSET_TARBALL)
    parser.add_argument("--work", type=Path, help="keep the work files here")
    args = parser.parse_args(argv)
    tree = given_tree()
    if tree is None:
        print(f"nixos-subset: set {TREE_ENV} to a whole NixOS 24.05 tree", file=sys.stderr)
        return 2
    if (tree / "COPYING").read_bytes() != (SUBSET / "COPYING").read_bytes():
        print(f"nixos-subset: {tree}/COPYING is not {SUBSET}/COPYING: another tree?",
              file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="nixos-subset-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    log(f"capture: {', '.join(TEST_FILES)} against {tree} under strace")
    strace_log = work / "strace.log"
    run_tests(tree, strace_log=strace_log)
    access = read_strace(strace_log, tree)
    members = select(tree, access)
    files = [m for m in members if m.kind == "file"]
    size = sum((tree / m.rel).stat().st_size for m in files)
    log(f"select: {len(access.named)} paths named, {len(access.listed)} directories listed; "
        f"{len(files)} files ({size / 1e6:.1f} MB), "
        f"{sum(m.kind == 'dir' for m in members)} directories, "
        f"{sum(m.kind == 'link' for m in members)} links")

    candidate = work / "tree.tar.xz"
    write_tarball(tree, members, candidate)
    log(f"write: {candidate} ({candidate.stat().st_size / 1e6:.2f} MB)")

    subset = work / "extracted"
    remove(subset)
    subset_tree = extract_subset(subset, candidate)
    log("check: rendering with the whole tree, then with the subset")
    whole = rendered(tree, work / "env")
    part = rendered(subset_tree, work / "env")
    diff = differences(whole, part)
    if diff:
        print("nixos-subset: the subset does not evaluate as the whole tree:",
              *diff[:40], sep="\n  ", file=sys.stderr)
        return 1
    log("check: identical; the tests against the subset")
    run_tests(subset_tree)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(candidate, args.output)
    log(f"done in {time.monotonic() - started:.0f} s: {args.output} "
        f"({args.output.stat().st_size} bytes, {len(files)} files)")
    if args.work is None:
        remove(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
