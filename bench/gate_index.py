"""Benchmark of the gate's first index of a large store: how long before it can answer.

    .venv/bin/python bench/gate_index.py [--sizes 10000 60000] [--runs 3]
                                         [--against-src DIR]

A gate's first look at the Nix store reads, parses, checks and hashes every .drv in it
(tracehook.gate.index; every request waits for it). A NixOS machine's store holds tens of
thousands. For each size, a synthetic store of that many build steps shaped like a package
set (bench/synth.py; a few more .drv files than steps: the sources' fetches), indexed
in a fresh process with the gate's own settings (its memory of parses, its garbage
collector settings, a fresh ``--cache-dir``), in turn:

- **pool**: as the gate does it (tracehook.stores.drvpool: worker processes read and
  parse; a store whose files come to more than a round is read in rounds, inputs first);
- **here**: the same index read in the gate's own thread alone (no worker processes: a
  one-core machine, or a store under 2,000 new .drv files), the baseline;
- with ``--against-src DIR`` (another checkout's ``src``: ``git worktree add /tmp/old
  REV``), **against**: that code's pool, so a change is measured against the code before
  it in the same run.

Prints, per size, the median (and spread) of the wall time, the CPU time of the gate's own
process (what the HTTP front and the engine would wait for), the peak resident memory of
the process and its workers together (sampled every 0.1 s, as bench/gate_scale.py), the
ratio pool / here, and the cost per 1,000 .drv files at each size against the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from gate_scale import RssWatch  # noqa: E402
from synth import generate  # noqa: E402

_ONE = """
import json, sys, tempfile, time
from pathlib import Path
from tracehook.gate.config import GateConfig
from tracehook.gate.index import DrvIndex
from tracehook.stores import drvpool
from tracehook.stores.factcache import FactCache
from tracehook.stores.nixstore import StoreReader
from tracehook.verify.walk import service_collections

def main():
    root, here, cache = sys.argv[1], sys.argv[2] == "here", sys.argv[3]
    if here:
        drvpool.MIN_PATHS = 10**9
    service_collections()
    cfg = GateConfig(policy=Path("/nonexistent"), upstreams=())
    facts = FactCache(Path(cache), background=True)
    reader = StoreReader(root, max_cached=cfg.drv_cache_size, max_bytes=cfg.drv_cache_bytes,
                         facts=facts)
    index = DrvIndex(reader)
    wall, cpu = time.perf_counter(), time.process_time()
    added = index.refresh()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    facts.close()
    print(json.dumps({"wall": wall, "cpu": cpu, "added": added}))

if __name__ == "__main__":
    main()
"""


def index_once(root: Path, mode: str, src: str) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds of the gate's process, peak MiB with its workers,
    .drv files indexed) of one first index in a fresh process."""
    env = dict(os.environ, PYTHONPATH=src)
    with tempfile.TemporaryDirectory(prefix="gate-index-cache-") as cache:
        proc = subprocess.Popen(
            [sys.executable, "-c", _ONE, str(root), "here" if mode == "here" else "pool",
             cache], stdout=subprocess.PIPE, env=env)
        watch = RssWatch(proc.pid)
        out, _ = proc.communicate()
        peak = watch.stop()
    if proc.returncode != 0:
        raise SystemExit(f"the index ({mode}) failed: exit {proc.returncode}")
    got = json.loads(out)
    return got["wall"], got["cpu"], peak, got["added"]


def spread(values: list[float], unit: str = "s") -> str:
    return (f"{statistics.median(values):.2f} {unit} ({min(values):.2f} to "
            f"{max(values):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 60_000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against-src", help="another checkout's src directory")
    args = parser.parse_args()
    modes = {"pool": str(REPO / "src"), "here": str(REPO / "src")}
    if args.against_src:
        modes["against"] = str(Path(args.against_src).resolve())
    per_file: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="gate-index-") as tmp:
        for size in args.sizes:
            closure = generate(Path(tmp) / str(size), size)
            root = closure.root
            results: dict[str, list[tuple[float, float, float, int]]] = {m: [] for m in modes}
            order = list(modes)
            for run in range(args.runs):
                for mode in order[run % len(order):] + order[:run % len(order)]:
                    results[mode].append(index_once(root, mode, modes[mode]))
            files = results["pool"][0][3]
            if any(r[3] != files for rs in results.values() for r in rs):
                raise SystemExit("the runs indexed different numbers of .drv files")
            print(f"\n{size} steps, {files} .drv files indexed, {args.runs} runs each")
            for mode, rs in results.items():
                print(f"  {mode:8} wall {spread([r[0] for r in rs])}, gate process CPU "
                      f"{spread([r[1] for r in rs])}, peak RSS with workers "
                      f"{spread([r[2] for r in rs], 'MiB')}")
            pool = statistics.median(r[0] for r in results["pool"])
            here = statistics.median(r[0] for r in results["here"])
            print(f"  pool / here (wall): {pool / here:.2f}")
            if "against" in results:
                pairs = [a[0] / b[0] for a, b in zip(results["pool"], results["against"],
                                                     strict=True)]
                print(f"  pool / against (wall, per run): {statistics.median(pairs):.2f} "
                      f"({min(pairs):.2f} to {max(pairs):.2f})")
            per_file[size] = pool / files * 1000
            smallest = min(per_file)
            print(f"  per 1,000 .drv files: {per_file[size]:.3f} s "
                  f"({per_file[size] / per_file[smallest]:.2f}x that at {smallest} steps)")


if __name__ == "__main__":
    main()
