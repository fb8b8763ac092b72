"""Benchmark of ``tracehook verify``: the laut stage1 target, and synthetic closures.

    .venv/bin/python bench/verify.py [--sizes 1000 10000] [--jobs 8]

Prints, in one run: the time to verify the stage1 target of the laut conformance data; for
synthetic closures of 1,000 and 10,000 floating-CA build steps (written as .drv files into a
temporary chroot-style store, each step with 1 to 5 inputs drawn from recent steps, two
signers, traces in a file trace store) the time to verify, the cost per step, and the ratio
to the floor: the time to only parse and check every signature of the same traces, one
after the other, in one process; and the same floor split over two threads (libsodium
releases the GIL while it verifies, parsing does not). The verifier itself runs as
``tracehook verify`` does: checker processes (one per core) for closures this large.
Keys and the stage1 data: laut's, vendored in tests/data/laut-v2 (tests/testkeys.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tracehook.nix.derivation import Derivation, DerivationOutput, encode_drv, serialize
from tracehook.nix.storepath import (
    derivation_path,
    make_fixed_output_path,
    make_store_path,
    upstream_placeholder,
)
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.tracestore import open_store
from tracehook.trace import crypto, jws
from tracehook.trace.claim import BuilderInfo, OutputClaim, sign_trace
from tracehook.trace.stepkey import InputOutput, step_key
from tracehook.verify.limits import Limits
from tracehook.verify.policy import Policy, parse_policy
from tracehook.verify.resolver import Resolver
from tracehook.verify.walk import Target

# The suite's one key helper, and laut's vendored data (tests/testkeys.py).
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from testkeys import CONFORMANCE, STAGE1, secret  # noqa: E402

BUILDER = BuilderInfo(1, "/nix/store", "nix", "2.26.3")
NOW = dt.datetime.now(dt.timezone.utc)


def both_policy() -> Policy:
    keys = "".join(
        f'{n} = "{crypto.format_public_key(secret(n).public)}"\n' for n in ("builderA", "builderB")
    )
    return parse_policy(f'[keys]\n{keys}[trust]\nrequire = {{ all-of = ["builderA", '
                        '"builderB"] }\n')


def write_traces(base: Path, traces: dict[str, list[str]]) -> None:
    (base / "traces").mkdir(parents=True, exist_ok=True)
    for key, tokens in traces.items():
        (base / "traces" / key).write_text(json.dumps({"signatures": tokens}))


def verify(policy: Policy, root: str, urls: list[str], target: str, jobs: int) -> float:
    reader = StoreReader(root)
    resolver = Resolver(policy, [open_store(u) for u in urls], reader.read_derivation, NOW,
                        Limits(workers=jobs))
    start = time.perf_counter()
    [report] = resolver.verify([Target(target, target)])
    elapsed = time.perf_counter() - start
    if not report.verified:
        raise SystemExit(f"bench target not verified: {report.reason}")
    return elapsed


def stage1(tmp: Path, jobs: int) -> float:
    """laut's own traces, read in place: the whole stage1 chain is signed by both."""
    policy = both_policy()
    root = str(CONFORMANCE / "store")
    urls = [f"file://{CONFORMANCE}"]
    return min(verify(policy, root, urls, STAGE1, jobs) for _ in range(3))


def generate(tmp: Path, steps: int, seed: int = 1) -> tuple[str, str, list[Path]]:
    """A closure of ``steps`` floating-CA steps over 20 fixed-output sources.

    Each ordinary step takes 1 to 5 inputs, picked from every earlier step with a bias to
    recent ones (a wide graph a few dozen steps deep, like a package set); the steps nothing
    depends on are then gathered by aggregate steps of up to 8 inputs (like buildEnv) until
    one target remains, so the target's closure holds every step.
    """
    rng = random.Random(seed)
    root = tmp / f"store{steps}"
    store_dir = root / "nix" / "store"
    store_dir.mkdir(parents=True)
    keys = list(secret(n) for n in ("builderA", "builderB"))
    traces: dict[str, list[str]] = {}
    made: list[tuple[str, str]] = []  # (drv path, output path)

    def write(drv: Derivation) -> str:
        path = derivation_path(drv)
        (store_dir / path.rsplit("/", 1)[1]).write_bytes(encode_drv(serialize(drv)))
        return path

    def step(name: str, picks: list[tuple[str, str]]) -> tuple[str, str]:
        picks = sorted(set(picks))
        deps = " ".join(upstream_placeholder(p, "out") for p, _ in picks)
        env = {"buildInputs": deps, "name": name, "out": "", "src": sources[0][1],
               "configureFlags": "--enable-shared --disable-static", "system": "x86_64-linux"}
        drv = Derivation({"out": DerivationOutput("", "r:sha256", "")},
                         {p: ("out",) for p, _ in picks}, (), "x86_64-linux", "/bin/sh",
                         ("-e", "builder.sh"), dict(sorted(env.items())))
        drv_path = write(drv)
        chosen = {(p, "out"): InputOutput(o, True) for p, o in picks}
        key = step_key(drv, chosen).key
        out = make_store_path("output:out", hashlib.sha256(name.encode()).digest(), name)
        claim = {"out": OutputClaim(out, hashlib.sha256(out.encode()).digest())}
        traces[key.key] = [sign_trace(k, key, claim, BUILDER, name) for k in keys]
        return drv_path, out

    sources = []
    for i in range(20):
        name = f"src-{i}.tar.gz"
        digest = hashlib.sha256(name.encode()).digest()
        out = make_fixed_output_path("flat", "sha256", digest, name)
        env = {"name": name, "out": out, "url": f"https://example.org/{name}"}
        drv = Derivation({"out": DerivationOutput(out, "sha256", digest.hex())}, {}, (),
                         "x86_64-linux", "/bin/sh", ("-c", "fetch"), env)
        sources.append((write(drv), out))
    used: set[str] = set()
    ordinary = steps - max(1, steps // 50)
    for i in range(ordinary):
        pool = made or sources
        picks = [pool[min(len(pool) - 1, int(len(pool) * rng.random() ** 0.3))]
                 for _ in range(rng.randint(1, 5))]
        if made:
            picks.append(rng.choice(sources))
        made.append(step(f"pkg-{i}", picks))
        used.update(p for p, _ in picks)
    layer = [m for m in made if m[0] not in used]
    n = 0
    while len(layer) > 1 or n == 0:
        layer = [step(f"env-{n + j}", layer[i:i + 8])
                 for j, i in enumerate(range(0, len(layer), 8))]
        n += len(layer)
    tstore = tmp / f"traces{steps}"
    write_traces(tstore, traces)
    return str(root), layer[0][0], sorted((tstore / "traces").iterdir())


def floor(files: list[Path], threads: int = 1) -> float:
    """Parse every trace file and check every signature: one after the other, or split
    over ``threads`` threads (as the resolver checks them)."""
    policy = both_policy()
    by_kid = {k.kid: k.public for k in policy.keys}

    def check(part: list[Path]) -> None:
        for f in part:
            for token in jws.parse_trace_file(f.read_bytes()):
                parsed = jws.parse_compact(token)
                kid = jws.kid_of(parsed)
                assert kid is not None
                jws.verify(parsed, by_kid[kid])

    start = time.perf_counter()
    if threads == 1:
        check(files)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(check, [files[i::threads] for i in range(threads)]))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--jobs", type=int, default=Limits.workers)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tracehook-bench-") as d:
        tmp = Path(d)
        t = stage1(tmp, args.jobs)
        print(f"laut stage1 target (12 derivations, 8 signed steps, 2 of 2): {t * 1000:.1f} ms")
        print(f"{'steps':>8} {'verify s':>9} {'per step us':>12} {'floor s':>8} {'ratio':>6} "
              f"{'floor 2 threads s':>18} {'ratio':>6}")
        for n in args.sizes:
            root, target, files = generate(tmp, n)
            count = len(files)  # signed build steps, all in the target's closure
            url = f"file://{tmp}/traces{n}"
            t = min(verify(both_policy(), root, [url], target, args.jobs) for _ in range(2))
            f, f2 = floor(files), floor(files, threads=2)
            print(f"{count:>8} {t:>9.2f} {t / count * 1e6:>12.0f} {f:>8.2f} {t / f:>6.2f} "
                  f"{f2:>18.2f} {t / f2:>6.2f}")


if __name__ == "__main__":
    main()
