"""Benchmark of the gate's cold verification with traces in SeaweedFS against the same
traces in a ``file://`` store, in one run.

    .venv/bin/python bench/gate_s3.py [--steps 1000] [--runs 5]

Synthesizes a closure of ``--steps`` floating-CA build steps (bench/synth.py: shaped like a
package set, two signers, a file trace store and a file binary cache), uploads the same
trace files to a SeaweedFS bucket (tests/seaweed.py), then, ``--runs`` times for each store,
alternating: a fresh ``tracehook-gate`` subprocess (policy 2 of 2, no ``--cache-dir``,
reading the bucket anonymously) is asked for the target's realisation
(``/build-trace-v2/<drv>/out.doi``), which makes it verify the whole closure: the time of
that first answer is the cold verification. Median and spread per store, and the ratio.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from gate import free_port  # noqa: E402
from synth import SIGNERS, generate  # noqa: E402

from gatekit import write_gate_key  # noqa: E402
from seaweed import Seaweed, clean_aws_env, upload_tree  # noqa: E402
from testkeys import secret  # noqa: E402
from tracehook.nix.storepath import basename  # noqa: E402
from tracehook.trace import crypto  # noqa: E402


def policy(path: Path, traces_url: str) -> Path:
    keys = "".join(f'{n} = "{crypto.format_public_key(secret(n).public)}"\n' for n in SIGNERS)
    path.write_text(f"traces = [{json.dumps(traces_url)}]\n\n[keys]\n{keys}\n[trust]\n"
                    f"require = {{ threshold = 2, of = {json.dumps(list(SIGNERS))} }}\n")
    return path


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
        closure = generate(base, args.steps)
        root, target, cache = closure.root, closure.target, closure.cache
        count = sum(1 for f in (closure.traces / "traces").iterdir()
                    if not f.name.startswith("."))
        gate_key, _ = write_gate_key(base)
        weed = Seaweed(base / "seaweed")
        weed.start()
        try:
            bucket = weed.bucket("bench-traces")
            upload_tree(weed.client(bucket), closure.traces)
            stores = {"file://": f"file://{closure.traces}", "SeaweedFS": weed.url(bucket)}
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
