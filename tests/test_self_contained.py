"""A clone anywhere passes its own tests: nothing reads outside the repository.

laut's conformance data is vendored in tests/data/laut-v2 with its licence and provenance;
no test, bench or script may reach for a directory beside the clone (the ``../shared`` the
first versions read from). The full proof is a clone in an empty directory running
``scripts/test.sh``; this keeps the cheap part of it in the suite.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from nixharness import REPO
from testkeys import CONFORMANCE

# A path built from the repository's parent: "parents[2]" from a file in tests/ or bench/,
# "REPO.parent", or the old shared directory's names.
_OUTSIDE = re.compile(r"parents\[2\]|REPO\.parent\b|\.\./shared|conformance-laut-v2")


def _tracked(*globs: str) -> list[Path]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "--", *globs],
                         capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines() if line]


def test_no_test_bench_or_script_reads_beside_the_clone() -> None:
    files = _tracked("tests/*.py", "tests/**/*.py", "bench/*.py", "scripts/*", "src/**/*.py")
    assert files
    offenders = [f"{f.relative_to(REPO)}:{n}: {line.strip()}"
                 for f in files if f.is_file()
                 for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
                 if _OUTSIDE.search(line) and f.name != Path(__file__).name]
    assert offenders == []


def test_vendored_laut_data_carries_licence_and_provenance() -> None:
    licence = (CONFORMANCE / "LICENSE.md").read_text()
    assert "EUROPEAN UNION PUBLIC LICENCE v. 1.2" in licence
    readme = (CONFORMANCE / "README.md").read_text()
    assert "https://github.com/mschwaig/laut" in readme
    assert "1e0e8b4ec331244d731f51742b8830ef8fbc967a" in readme
    for path in ("testkeys/", "tests/data/traces/signatures/",
                 "tests/data/drv_lookup/hello-ca-recursive-unresolved-aterm.json"):
        assert path in readme
    # Every vendored file is tracked, so a clone has it.
    tracked = {p.relative_to(CONFORMANCE) for p in _tracked(str(CONFORMANCE))}
    on_disk = {p.relative_to(CONFORMANCE) for p in CONFORMANCE.rglob("*") if p.is_file()}
    assert on_disk <= tracked, sorted(map(str, on_disk - tracked))[:5]
    assert len([p for p in tracked if p.parts[0] == "traces"]) == 97
    assert len([p for p in tracked if p.parts[0] == "store"]) == 12
