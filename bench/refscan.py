"""Benchmark of reference scanning (``nix/refscan.py``): what the gate pays, per MiB of NAR,
to find the references of a path whose claims attest none (laut's traces).

    .venv/bin/python bench/refscan.py [--sizes 1,16,64] [--runs 7] [--candidates 64]

For each size, one generated NAR (``nix/nar.py`` over a directory of 256 KiB files: three
in four are text lines that name a store path about every 64 KiB, one in four pseudo-random
bytes), kept uncompressed and compressed with xz (preset 6, the level Nix uses by default).
``--candidates`` store paths are searched for (what the gate passes: the listed references,
the step's direct inputs and its own outputs); the NAR names half of them (the smallest
NARs fewer: one every 64 KiB of text). Each run
times, over the same bytes in the 256 KiB chunks the gate reads:

- ``sha256``: a plain sha256 of the uncompressed NAR (what checking a NAR hash costs);
- ``scan``: :func:`tracehook.nix.refscan.scan` of the uncompressed NAR (sha256 and the
  search for every candidate's hash part);
- ``xz+sha256``: xz decompression and a sha256 (what hashing a compressed NAR costs);
- ``scan xz``: the scan of the xz-compressed NAR.

Printed per size: the median cost in ms per MiB of (uncompressed) NAR and the range over the
runs, and the ratios ``scan / sha256`` and ``scan xz / sha256`` computed within each run
(median and range): the same bytes, measured back to back.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tracehook.nix import nar, nixbase32  # noqa: E402
from tracehook.nix.refscan import scan  # noqa: E402

CHUNK = 256 * 1024
FILE = 256 * 1024
WORDS = ("lib", "usr", "share", "bin", "include", "pkgconfig", "config", "version",
         "error", "warning", "static", "const", "return", "struct", "buffer", "main")


def store_path(rng: random.Random, i: int) -> str:
    return f"/nix/store/{nixbase32.encode(rng.randbytes(20))}-dep-{i}"


def make_tree(root: Path, size: int, present: Sequence[str], rng: random.Random) -> None:
    """Files adding up to ``size`` bytes; text files name a present path every ~64 KiB."""
    root.mkdir()
    written = 0
    i = 0
    while written < size:
        n = min(FILE, size - written)
        if i % 4 == 3:
            data = rng.randbytes(n)
        else:
            parts: list[str] = []
            length = 0
            since = 0
            while length < n:
                if since >= 64 * 1024:
                    line = f"RPATH={rng.choice(present)}/lib\n"
                    since = 0
                else:
                    line = " ".join(rng.choice(WORDS) for _ in range(8)) + "\n"
                parts.append(line)
                length += len(line)
                since += len(line)
            data = "".join(parts).encode()[:n]
        (root / f"f{i:05d}").write_bytes(data)
        written += n
        i += 1


def chunks(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def sha256_of(parts: Sequence[bytes]) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def xz_sha256(parts: Sequence[bytes]) -> bytes:
    h = hashlib.sha256()
    d = lzma.LZMADecompressor()
    for part in parts:
        h.update(d.decompress(part))
    return h.digest()


def spread(values: Sequence[float], fmt: str) -> str:
    return (f"{format(statistics.median(values), fmt)} "
            f"({format(min(values), fmt)}-{format(max(values), fmt)})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,16,64", help="NAR sizes in MiB (default 1,16,64)")
    ap.add_argument("--runs", type=int, default=7, help="runs per size (default 7)")
    ap.add_argument("--candidates", type=int, default=64,
                    help="store paths searched for, half of them present (default 64)")
    args = ap.parse_args(argv)
    rng = random.Random(13)
    candidates = [store_path(rng, i) for i in range(args.candidates)]
    present = candidates[: max(1, args.candidates // 2)]

    print(f"{args.candidates} candidate paths, {len(present)} present; {args.runs} runs; "
          "ms per MiB of uncompressed NAR, median (min-max); ratios within each run")
    print(f"{'NAR':>8} {'xz':>7} | {'sha256':>16} {'scan':>16} {'scan/sha256':>17} | "
          f"{'xz+sha256':>16} {'scan xz':>16} {'scan xz/sha256':>17}")
    with tempfile.TemporaryDirectory(prefix="tracehook-bench-refscan-") as tmp:
        for mib in (int(s) for s in args.sizes.split(",")):
            tree = Path(tmp) / f"tree-{mib}"
            make_tree(tree, mib << 20, present, rng)
            data = b"".join(nar.dump(tree))
            packed = lzma.compress(data, preset=6)
            plain, xz = chunks(data), chunks(packed)
            want = hashlib.sha256(data).digest()
            named = frozenset(p for p in candidates if p[11:43].encode() in data)
            size = len(data) / (1 << 20)
            rows: dict[str, list[float]] = {k: [] for k in ("sha", "scan", "xzsha", "xzscan")}
            for got in (scan(plain, "none", candidates), scan(xz, "xz", candidates)):
                if got.nar_sha256 != want or got.found != named:
                    raise SystemExit("the scan found the wrong paths or hashed other bytes")
            for _ in range(args.runs):
                rows["sha"].append(timed(sha256_of, plain))
                rows["scan"].append(timed(scan, plain, "none", candidates))
                rows["xzsha"].append(timed(xz_sha256, xz))
                rows["xzscan"].append(timed(scan, xz, "xz", candidates))
            per = {k: [t * 1000 / size for t in v] for k, v in rows.items()}
            ratio = [s / h for s, h in zip(rows["scan"], rows["sha"], strict=True)]
            ratio_xz = [s / h for s, h in zip(rows["xzscan"], rows["sha"], strict=True)]
            print(f"{size:7.1f}M {len(packed) / len(data):6.0%} | "
                  f"{spread(per['sha'], '.2f'):>16} {spread(per['scan'], '.2f'):>16} "
                  f"{spread(ratio, '.2f'):>17} | {spread(per['xzsha'], '.2f'):>16} "
                  f"{spread(per['xzscan'], '.2f'):>16} {spread(ratio_xz, '.2f'):>17}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
