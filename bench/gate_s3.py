"""Benchmark of the gate's cold verification with traces in SeaweedFS against the same
traces in a ``file://`` store, in one run.

    .venv/bin/python bench/gate_s3.py [--steps 1000] [--runs 5]

Writes a closure of ``--steps`` floating-CA build steps (.drv files in a temporary
chroot-style store; each ordinary step has 1 to 5 inputs drawn with a bias to recent steps
plus a fixed-output source, then aggregate steps of up to 8 inputs gather everything under
one target, as bench/verify.py does), two signers, traces in a directory and the same files
uploaded to a SeaweedFS bucket (tests/seaweed.py), and a binary cache holding the target's
narinfo. Then, ``--runs`` times for each store, alternating: a fresh ``tracehook-gate``
subprocess (policy 2 of 2, reading the bucket anonymously) is asked for the target's
realisation (``/build-trace-v2/<drv>/out.doi``), which makes it verify the whole closure:
the time of that first answer is the cold verification. Median and spread per store, and
the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from gatekit import key, public_text, write_gate_key  # noqa: E402
from seaweed import Seaweed, clean_aws_env, upload_tree  # noqa: E402
from tracehook.nix import narinfo  # noqa: E402
from tracehook.nix.derivation import Derivation, DerivationOutput, encode_drv, serialize  # noqa: E402
from tracehook.nix.nar import format_nar_hash  # noqa: E402
from tracehook.nix.storepath import (  # noqa: E402
    basename,
    derivation_path,
    hash_part,
    make_fixed_output_path,
    make_store_path,
    upstream_placeholder,
)
from tracehook.trace.claim import BuilderInfo, OutputClaim, sign_trace  # noqa: E402
from tracehook.trace.jws import render_trace_file  # noqa: E402
from tracehook.trace.stepkey import InputOutput, step_key  # noqa: E402

SIGNERS = ("builderA", "builderB")
BUILDER = BuilderInfo(1, "/nix/store", "nix", "bench")


def closure(base: Path, steps: int, seed: int = 7) -> tuple[Path, str, str, bytes]:
    """(store root, target .drv, target output, its NAR hash); traces in base/traces."""
    rng = random.Random(seed)
    root = base / "store"
    store_dir = root / "nix" / "store"
    store_dir.mkdir(parents=True)
    (base / "traces" / "traces").mkdir(parents=True)
    sks = [key(n) for n in SIGNERS]

    def write(drv: Derivation) -> str:
        path = derivation_path(drv)
        (store_dir / basename(path)).write_bytes(encode_drv(serialize(drv)))
        return path

    sources: list[tuple[str, str]] = []
    for i in range(20):
        name = f"src-{i}.tar.gz"
        digest = hashlib.sha256(name.encode()).digest()
        out = make_fixed_output_path("flat", "sha256", digest, name)
        sources.append((write(Derivation({"out": DerivationOutput(out, "sha256", digest.hex())},
                                         {}, (), "x86_64-linux", "/bin/sh", ("-c", "fetch"),
                                         {"name": name, "out": out})), out))

    def step(name: str, picks: list[tuple[str, str]]) -> tuple[str, str, bytes]:
        picks = sorted(set(picks))
        env = {"deps": " ".join(upstream_placeholder(p, "out") for p, _ in picks),
               "name": name, "out": "", "system": "x86_64-linux"}
        drv = Derivation({"out": DerivationOutput("", "r:sha256", "")},
                         {p: ("out",) for p, _ in picks}, (), "x86_64-linux", "/bin/sh",
                         ("-e", "builder.sh"), env)
        drv_path = write(drv)
        k = step_key(drv, {(p, "out"): InputOutput(o, True) for p, o in picks}).key
        out = make_store_path("output:out", hashlib.sha256(name.encode()).digest(), name)
        nar = hashlib.sha256(out.encode()).digest()
        tokens = [sign_trace(sk, k, {"out": OutputClaim(out, nar)}, BUILDER, name) for sk in sks]
        (base / "traces" / "traces" / k.key).write_bytes(render_trace_file(tokens))
        return drv_path, out, nar

    made: list[tuple[str, str]] = []
    used: set[str] = set()
    for i in range(steps - max(1, steps // 50)):
        pool = made or sources
        picks = [pool[min(len(pool) - 1, int(len(pool) * rng.random() ** 0.3))]
                 for _ in range(rng.randint(1, 5))] + [rng.choice(sources)]
        drv_path, out, _ = step(f"pkg-{i}", picks)
        made.append((drv_path, out))
        used.update(p for p, _ in picks)
    layer = [m for m in made if m[0] not in used]
    n, last = 0, None
    while len(layer) > 1 or last is None:
        built = [step(f"env-{n + j}", layer[i:i + 8])
                 for j, i in enumerate(range(0, len(layer), 8))]
        n += len(built)
        layer = [(d, o) for d, o, _ in built]
        last = built[-1]
    return root, last[0], last[1], last[2]


def policy(path: Path, traces_url: str) -> Path:
    keys = "".join(f'{n} = {{ key = "{public_text(n)}" }}\n' for n in SIGNERS)
    path.write_text(f"traces = [{json.dumps(traces_url)}]\n\n[keys]\n{keys}\n[trust]\n"
                    f"require = {{ threshold = 2, of = {json.dumps(list(SIGNERS))} }}\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cold(base: Path, pol: Path, cache: Path, root: Path, target: str, gate_key: Path) -> float:
    port = free_port()
    gate = subprocess.Popen(
        [str(Path(sys.executable).parent / "tracehook-gate"), "--policy", str(pol),
         "--upstream", f"file://{cache}", "--listen", f"127.0.0.1:{port}", "--store",
         str(root), "--signing-key", str(gate_key), "--quiet",
         "--log-file", str(base / "gate.log")], env=clean_aws_env())
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                conn.request("GET", "/nix-cache-info")
                conn.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline or gate.poll() is not None:
                    raise SystemExit("the gate did not start") from None
                time.sleep(0.05)
        start = time.perf_counter()
        conn.request("GET", f"/build-trace-v2/{basename(target)}/out.doi")
        resp = conn.getresponse()
        body = resp.read()
        elapsed = time.perf_counter() - start
        if resp.status != 200:
            raise SystemExit(f"the gate answered {resp.status}: {body[:300]!r}")
        conn.close()
        return elapsed
    finally:
        gate.terminate()
        gate.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tracehook-bench-gate-s3-") as d:
        base = Path(d)
        root, target, out, nar = closure(base, args.steps)
        count = len(list((base / "traces" / "traces").iterdir()))
        cache = base / "cache"
        cache.mkdir()
        (cache / "nix-cache-info").write_text("StoreDir: /nix/store\n")
        ni = narinfo.NarInfo(store_path=out, nar_hash=format_nar_hash(nar), nar_size=1,
                             url="nar/x.nar", compression="none", ca=None)
        (cache / f"{hash_part(out)}.narinfo").write_text(narinfo.render(ni))
        gate_key, _ = write_gate_key(base)
        weed = Seaweed(base / "seaweed")
        weed.start()
        try:
            bucket = weed.bucket("bench-traces")
            upload_tree(weed.client(bucket), base / "traces")
            stores = {"file://": f"file://{base / 'traces'}", "SeaweedFS": weed.url(bucket)}
            times: dict[str, list[float]] = {name: [] for name in stores}
            for _ in range(args.runs):
                for name, url in stores.items():
                    pol = policy(base / f"policy-{len(times[name])}.toml", url)
                    times[name].append(cold(base, pol, cache, root, target, gate_key))
        finally:
            weed.stop()
    print(f"cold verification through the gate: {count} signed steps, 2 signers, 2 of 2, "
          f"{args.runs} runs each (a fresh gate each time)")
    for name, ts in times.items():
        print(f"  traces in {name:<10} median {statistics.median(ts):.3f} s (min {min(ts):.3f},"
              f" max {max(ts):.3f}): {', '.join(f'{t:.3f}' for t in ts)}")
    ratio = statistics.median(times["SeaweedFS"]) / statistics.median(times["file://"])
    print(f"  SeaweedFS / file://: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
