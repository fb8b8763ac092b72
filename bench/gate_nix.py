"""End to end with real Nix 2.26: substituting a closure of N floating-CA paths through the
gate, against the same substitution straight from the binary cache.

    .venv/bin/python bench/gate_nix.py [--steps 600] [--runs 3]

A builder store (``secret-key-files`` set, so Nix signs narinfos and realisations) builds a
closure shaped like a package set: N floating content-addressed steps, each writing the
paths of its inputs into its output (so every output refers to its inputs), under one
aggregate. Every step is signed into a file trace store, and ``nix copy`` fills a file
binary cache with the outputs and the realisations. Then, for each run, two fresh consumer
stores instantiate the closure and substitute it with ``nix-build --max-jobs 0`` (they may
not build anything):

- **direct**: the cache is the substituter, its key trusted;
- **gate**: a ``tracehook gate`` (a subprocess, a fresh ``--cache-dir``: every decision
  cold) is the only substituter, only its key trusted.

Prints both wall times per run, the ratio, and the median and spread of the ratios.
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

from gate_scale import free_port, wait_ready  # noqa: E402

from gatekit import key, sign_closure, write_gate_key, write_policy  # noqa: E402
from nixharness import NixEnv, get_tier  # noqa: E402
from tracehook.trace import crypto  # noqa: E402

TRACEHOOK = str(Path(sys.executable).parent / "tracehook")

CLOSURE_NIX = r"""
{ n ? 600, salt ? "" }:
let
  bb = builtins.path { path = ./bb; name = "busybox-static"; };
  step = i: deps: derivation {
    name = "pkg-${toString i}";
    system = builtins.currentSystem;
    builder = "${bb}/busybox";
    args = [ "sh" "-c" "echo ${salt} ${toString i} $deps > $out" ];
    inherit deps;
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  };
  picks = i: if i == 0 then [ ] else
    builtins.attrValues (builtins.listToAttrs (map (j: { name = toString j; value = j; })
      [ (i - 1) (i / 2) (i / 3) ((i * 7) / 11) ]));
  steps = builtins.genList (i: step i (map (j: builtins.elemAt steps j) (picks i))) n;
in {
  top = derivation {
    name = "top";
    system = builtins.currentSystem;
    builder = "${bb}/busybox";
    args = [ "sh" "-c" "echo $deps > $out" ];
    deps = steps;
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  };
}
"""


def nix_build(
    env: NixEnv, steps: int, *args: str
) -> tuple[float, subprocess.CompletedProcess[str]]:
    argv = [
        str(env.tier.bindir / "nix-build"),
        "--no-out-link",
        str(env.exprs / "closure.nix"),
        "-A",
        "top",
        "--arg",
        "n",
        str(steps),
        *args,
    ]
    start = time.perf_counter()
    res = subprocess.run(
        argv, env=env.env(), cwd=env.base, capture_output=True, text=True, timeout=3600
    )
    return time.perf_counter() - start, res


def instantiate_all(env: NixEnv, steps: int) -> str:
    (env.exprs / "closure.nix").write_text(CLOSURE_NIX)
    res = subprocess.run(
        [
            str(env.tier.bindir / "nix-instantiate"),
            str(env.exprs / "closure.nix"),
            "-A",
            "top",
            "--arg",
            "n",
            str(steps),
        ],
        env=env.env(),
        cwd=env.base,
        capture_output=True,
        text=True,
        check=True,
    )
    return res.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tier = get_tier("2.26")
    with tempfile.TemporaryDirectory(prefix="tracehook-gate-nix-") as d:
        tmp = Path(d)
        cache_key = key("cache-1")
        sec = tmp / "cache-1.secret"
        sec.write_text(crypto.format_secret_key(cache_key))
        builder = NixEnv(tier, tmp / "builder")
        builder.configure(secret_key_files=str(sec), max_jobs="4")
        top = instantiate_all(builder, args.steps)
        t, res = nix_build(builder, args.steps)
        if res.returncode != 0:
            raise SystemExit(f"build failed: {res.stderr[-2000:]}")
        print(f"built {args.steps} steps in {t:.1f} s", flush=True)
        traces = tmp / "traces"
        sign_closure(builder, [top], key("builderA"), traces)
        drvs = subprocess.run(
            [str(tier.bindir / "nix-store"), "--query", "--requisites", top],
            env=builder.env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        cache = tmp / "cache"
        outs = res.stdout.split()
        builder.run(
            "nix",
            "copy",
            "--to",
            f"file://{cache}",
            *outs,
            *(f"{p}^*" for p in drvs if p.endswith(".drv")),
            timeout=3600,
        )
        policy = write_policy(tmp / "policy.toml", traces, '"builderA"', ["builderA"])
        gate_key, gate_pub = write_gate_key(tmp)
        ratios = []
        print(f"{'run':>4} {'direct s':>9} {'gate s':>8} {'ratio':>6}")
        for run in range(args.runs):
            direct = NixEnv(tier, tmp / f"direct{run}")
            direct.configure(
                substituters=f"file://{cache}",
                trusted_public_keys=crypto.format_public_key(cache_key.public),
            )
            instantiate_all(direct, args.steps)
            t_direct, res = nix_build(direct, args.steps, "--max-jobs", "0")
            if res.returncode != 0:
                raise SystemExit(f"direct substitution failed: {res.stderr[-2000:]}")
            consumer = NixEnv(tier, tmp / f"consumer{run}")
            instantiate_all(consumer, args.steps)
            port = free_port()
            gate = subprocess.Popen(
                [
                    TRACEHOOK,
                    "gate",
                    "--policy",
                    str(policy),
                    "--upstream",
                    f"file://{cache}",
                    "--store",
                    str(consumer.root),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--quiet",
                    "--signing-key",
                    str(gate_key),
                    "--cache-dir",
                    str(tmp / f"gate-cache{run}"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_ready(port, gate)
                consumer.configure(
                    substituters=f"http://127.0.0.1:{port}", trusted_public_keys=gate_pub
                )
                t_gate, res = nix_build(consumer, args.steps, "--max-jobs", "0")
            finally:
                gate.terminate()
                gate.wait(timeout=30)
            if res.returncode != 0:
                raise SystemExit(f"substitution through the gate failed: {res.stderr[-2000:]}")
            ratios.append(t_gate / t_direct)
            print(f"{run:>4} {t_direct:>9.2f} {t_gate:>8.2f} {t_gate / t_direct:>6.2f}", flush=True)
            shutil.rmtree(direct.base, ignore_errors=True)
            shutil.rmtree(consumer.base, ignore_errors=True)
        print(
            f"ratio gate/direct: median {statistics.median(ratios):.2f} "
            f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {len(ratios)} runs of "
            f"{args.steps + 1} paths"
        )


if __name__ == "__main__":
    main()
