"""What one request costs the client: curl, http.client, libcurl's multi interface, a lean one.

    .venv/bin/python bench/client_cost.py [--steps 1000] [--runs 3]

bench/gate_scale.py stands in for a substituting Nix with Python clients on the same cores
as the gate, so their cost per request is part of every figure it prints. This measures
it against a gate answering from memory (a synthetic closure of ``--steps`` build steps,
every path asked once first): each client asks for every path once on one keep-alive
connection, and the CPU seconds it used (its process's, from getrusage) are divided by the
requests. curl (the command-line tool over libcurl, as Nix uses libcurl) reads its URLs
from a config file and writes each answer to /dev/null. The order of the clients rotates
from run to run.

The fourth column is http.client again, as 8 threads of one process sharing the work (how
bench/gate_scale.py ran its clients before it forked them): the CPU the process used, per
request. Threads of one interpreter take turns at its lock, and handing it over costs CPU
of its own. The last is bench/gate_scale.py's ``--client multi``: one process driving
libcurl's multi interface with 8 connections, as Nix's own file transfer asks.
"""

from __future__ import annotations

import argparse
import http.client
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import gate_scale  # noqa: E402
from synth import with_policy  # noqa: E402


def in_threads(port: int, paths: list[str], threads: int, seed: int) -> None:
    """Every path once, by ``threads`` http.client threads of this process."""
    work = list(paths)
    random.Random(seed).shuffle(work)
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if not work:
                    break
                path = work.pop()
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise SystemExit(f"{path}: {resp.status}")
        conn.close()

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("client_cost: curl is not installed (apt-get install curl)")
    with tempfile.TemporaryDirectory(prefix="tracehook-client-cost-") as d:
        tmp = Path(d)
        closure, policy = with_policy(tmp, args.steps)
        with gate_scale.gate_process(policy, closure, tmp / "cache-dir") as (port, _):
            gate_scale.ask_all(port, closure, 8, 0)  # every answer in the gate's memory
            paths = [p for pair in closure.requests() for p in pair if p]
            config = tmp / "curl.cfg"
            config.write_text("".join(f'url = "http://127.0.0.1:{port}{p}"\n'
                                      'output = "/dev/null"\n' for p in paths))
            costs: dict[str, list[float]] = {"curl": [], "stdlib": [], "lean": [],
                                             "stdlib-8-threads": [], "multi-8": []}
            order = list(costs)
            print(f"{'run':>4} " + " ".join(f"{n + ' us/request':>18}" for n in order))
            for run in range(args.runs):
                got: dict[str, float] = {}
                for name in order[run % len(order):] + order[:run % len(order)]:
                    who = (resource.RUSAGE_SELF if name == "stdlib-8-threads"
                           else resource.RUSAGE_CHILDREN)
                    before = gate_scale.rusage_cpu(who)
                    if name == "curl":
                        subprocess.run([curl, "-s", "--fail", "-K", str(config)], check=True)
                    elif name == "stdlib-8-threads":
                        in_threads(port, paths, 8, run)
                    elif name == "multi-8":  # one process, 8 connections (as gate_scale)
                        gate_scale.CLIENT[0] = "multi"
                        gate_scale.ask_all(port, closure, 8, run)
                    else:  # one client process
                        gate_scale.CLIENT[0] = name
                        gate_scale.ask_all(port, closure, 1, run)
                    used = gate_scale.rusage_cpu(who) - before
                    got[name] = used / len(paths) * 1e6
                    costs[name].append(got[name])
                print(f"{run:>4} " + " ".join(f"{got[n]:>18.0f}" for n in order), flush=True)
            for name in order:
                v = sorted(costs[name])
                print(f"{name}: median {v[len(v) // 2]:.0f} us of CPU a request "
                      f"(min {v[0]:.0f}, max {v[-1]:.0f}) over {len(v)} runs of {len(paths)}")


if __name__ == "__main__":
    main()
