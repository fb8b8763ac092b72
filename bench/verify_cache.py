"""``tracehook verify`` run again with the same ``--cache-dir``: what the persistent cache saves.

    .venv/bin/python bench/verify_cache.py [--runs 10] [--steps 1000]

Two workloads, each verified by the CLI (a whole process, as a user runs it):

- **laut stage1**: laut's own traces and derivations (vendored in tests/data/laut-v2), the
  stage1 stdenv target, 2 of 2 builders;
- **synthetic**: a closure of ``--steps`` build steps shaped like a package set
  (bench/synth.py), 2 of 2 builders.

Each run times, alternating, ``tracehook --version`` (the start-up floor), a first
verification with a fresh ``--cache-dir``, a second one with the same directory (the same
command: its answer is replayed when nothing it read changed, tracehook.verify.replay), and
a third with the same directory and another command line (an explicit ``--at``): not
replayed, so what the facts cache alone saves. The work of a verification is its time above
the median ``--version``. Prints the median and spread of each, and the ratio of the second
and third runs' work to the first's (the target for the laut closure: at most 0.25).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from synth import generate, policy_text  # noqa: E402

from testkeys import CONFORMANCE, LAUT_KEYS, STAGE1, public_text  # noqa: E402

TRACEHOOK = str(Path(sys.executable).parent / "tracehook")


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:8.1f} ms ({min(xs) * 1000:.1f} to {max(xs) * 1000:.1f})"


def measure(name: str, tag: str, policy: Path, root: Path, target: str, runs: int,
            tmp: Path) -> None:
    version: list[float] = []
    first: list[float] = []
    second: list[float] = []
    third: list[float] = []
    for n in range(runs):
        cache = tmp / f"cache-{tag}-{n}"
        argv = [TRACEHOOK, "verify", "--policy", str(policy), "--store", str(root),
                "--cache-dir", str(cache), target]
        version.append(timed([TRACEHOOK, "--version"]))
        first.append(timed(argv))
        second.append(timed(argv))
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        third.append(timed([*argv, "--at", at]))
        shutil.rmtree(cache)
    floor = statistics.median(version)
    work1 = [t - floor for t in first]
    work2 = [t - floor for t in second]
    work3 = [t - floor for t in third]
    ratios = [b / a for a, b in zip(work1, work2, strict=True)]
    facts = [b / a for a, b in zip(work1, work3, strict=True)]
    print(f"{name}:")
    print(f"  tracehook --version        {spread(version)}")
    print(f"  first run (fresh cache)    {spread(first)}")
    print(f"  second run (same cache)    {spread(second)}")
    print(f"  third, another --at        {spread(third)}")
    print(f"  work of the second / first: median {statistics.median(ratios):.2f} "
          f"({min(ratios):.2f} to {max(ratios):.2f})")
    print(f"  work of the third / first: median {statistics.median(facts):.2f} "
          f"({min(facts):.2f} to {max(facts):.2f}) (facts cache, no replay)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1000, help="synthetic closure size (0: skip)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        keys = "".join(f'{n} = "{public_text(n)}"\n' for n in LAUT_KEYS)
        laut = tmp / "laut.toml"
        laut.write_text(f'traces = ["file://{CONFORMANCE}"]\n\n[keys]\n{keys}\n[trust]\n'
                        'require = { all-of = ["builderA", "builderB"] }\n')
        measure("laut stage1 (12 derivations, 8 signed steps, 2 of 2)", "laut", laut,
                CONFORMANCE / "store", STAGE1, args.runs, tmp)
        if args.steps:
            closure = generate(tmp / "synth", args.steps)
            policy = tmp / "synth.toml"
            policy.write_text(policy_text(closure.traces))
            measure(f"synthetic closure, {len(closure.steps)} steps, 2 of 2", "synth", policy,
                    closure.root, closure.target, args.runs, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
