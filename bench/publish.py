"""Benchmark of publishing into an S3 trace store: a real SeaweedFS on 127.0.0.1.

    .venv/bin/python bench/publish.py [--traces 1000] [--publishers 1 4] [--runs 3]

Starts one single-node SeaweedFS (tests/seaweed.py), then, for each count of publishers,
``--runs`` times into a fresh bucket: that many processes, each with its own signing key and
a spool of ``--traces`` signed traces for the same build steps in the same order (every
builder of a fleet signs the same steps; publishing them at the same moment is the hardest
case for the compare-and-swap loop), drain their spools at once with the publisher the
daemon runs (:class:`tracehook.signer.publish.Publisher`: read the key, skip a claim
already there, else GET and conditional PUT, again after a 409/412). Reported per run:
traces per second over all publishers (wall time from the first publisher's start, once
every spool is filled, to the last one's end), the share of conditional PUTs answered
412/409 (another writer was first), and requests retried after a 5xx or a timeout; then the
median and spread over the runs. Every run checks that every signature of every publisher
is in the bucket.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import statistics
import sys
import tempfile
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from seaweed import BUILDER_A, Seaweed  # noqa: E402
from tracehook.nix import nixbase32  # noqa: E402
from tracehook.nix.nar import format_nar_hash  # noqa: E402
from tracehook.signer.publish import Publisher  # noqa: E402
from tracehook.stores.eventlog import EventLog  # noqa: E402
from tracehook.stores.s3 import S3TraceStore  # noqa: E402
from tracehook.stores.spool import Spool, SpoolEntry  # noqa: E402
from tracehook.trace import crypto  # noqa: E402
from tracehook.trace.claim import BuilderInfo, OutputClaim, TraceKey, sign_trace  # noqa: E402


def signer(n: int) -> crypto.SecretKey:
    return crypto.SecretKey(f"bench-builder-{n}", hashlib.sha256(f"bench {n}".encode()).digest())


def entry(i: int, sk: crypto.SecretKey) -> SpoolEntry:
    """Step ``i``'s trace as signer ``sk`` spools it (the same step for every signer)."""
    key = nixbase32.encode(hashlib.sha256(f"step {i}".encode()).digest()[:20])
    out = OutputClaim(f"/nix/store/{nixbase32.encode(hashlib.sha256(key.encode()).digest()[:20])}"
                      f"-step{i}", hashlib.sha256(f"nar {i}".encode()).digest())
    token = sign_trace(sk, TraceKey("ca", key, f"/nix/store/{key}-step{i}.drv"), {"out": out},
                       BuilderInfo(i, "/nix/store", "nix", "bench"), f"step{i}")
    return SpoolEntry("ca", key, f"{sk.name}:{crypto.thumbprint16(sk.public)}",
                      f"/nix/store/{'2' * 32}-step{i}.drv",
                      {"out": {"path": out.path, "hash": format_nar_hash(out.nar_hash)}},
                      token, 1000.0 + i, crypto.format_public_key(sk.public))


def _publisher(url: str, spool_dir: str, n: int, traces: int, ready: Barrier,
               results: Queue[tuple[int, float, float, int, int, int]]) -> None:
    """One publisher process: fill its spool (untimed), wait for the others, drain."""
    spool = Spool(Path(spool_dir))
    sk = signer(n)
    for i in range(traces):
        spool.add(entry(i, sk))
    store = S3TraceStore(url)
    publisher = Publisher(spool, [store], EventLog(None, stderr=None))
    ready.wait()
    start = time.time()
    report = publisher.drain()
    end = time.time()
    if not report.complete:
        raise SystemExit(f"publisher {n}: {report.errors}")
    results.put((len(report.delivered), start, end, store.puts, store.conflicts,
                 store.s3.retried))


def run(weed: Seaweed, tmp: Path, publishers: int, traces: int, tag: str) -> dict[str, float]:
    bucket = weed.bucket(f"bench-{publishers}")
    url = weed.url(bucket)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(publishers)
    results: Queue[tuple[int, float, float, int, int, int]] = ctx.Queue()
    procs = [ctx.Process(target=_publisher, args=(url, str(tmp / f"{tag}-spool{n}"), n, traces,
                                                  ready, results))
             for n in range(publishers)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
        if p.exitcode != 0:
            raise SystemExit(f"a publisher exited with {p.exitcode}")
    elapsed = max(r[2] for r in got) - min(r[1] for r in got)
    delivered = sum(r[0] for r in got)
    puts, conflicts = sum(r[3] for r in got), sum(r[4] for r in got)
    reader = S3TraceStore(url)
    for i in range(traces):
        e = entry(i, signer(0))
        have = reader.get(e.key)
        if len(have) != publishers or e.jws not in have:
            raise SystemExit(f"step {i}: {len(have)} signatures, expected {publishers}")
    return {"traces_s": delivered / elapsed, "conflict_share": conflicts / max(1, puts),
            "elapsed": elapsed, "puts": puts, "conflicts": conflicts,
            "retried": sum(r[5] for r in got)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=int, default=1000, help="traces per publisher")
    ap.add_argument("--publishers", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    import os

    os.environ.update(BUILDER_A.env())  # the publishers' credentials, inherited
    with tempfile.TemporaryDirectory(prefix="tracehook-bench-publish-") as d:
        tmp = Path(d)
        weed = Seaweed(tmp / "seaweed")
        weed.start()
        try:
            print(f"SeaweedFS {weed.endpoint}; {args.traces} traces per publisher, "
                  f"{args.runs} runs each")
            for n in args.publishers:
                rows = [run(weed, tmp, n, args.traces, f"p{n}r{r}") for r in range(args.runs)]
                for r, row in enumerate(rows):
                    print(f"  {n} publisher(s), run {r + 1}: {row['traces_s']:7.0f} traces/s "
                          f"({n * args.traces} in {row['elapsed']:.2f} s), "
                          f"{row['conflicts']}/{row['puts']} PUTs answered 412/409 "
                          f"({row['conflict_share']:.1%}), {row['retried']} retried")
                rates = [row["traces_s"] for row in rows]
                shares = [row["conflict_share"] for row in rows]
                print(f"{n} publisher(s): median {statistics.median(rates):.0f} traces/s "
                      f"(min {min(rates):.0f}, max {max(rates):.0f}); 412/409 share median "
                      f"{statistics.median(shares):.1%} (min {min(shares):.1%}, "
                      f"max {max(shares):.1%})")
        finally:
            weed.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
