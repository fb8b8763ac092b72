"""End to end with real Nix 2.26: substituting a closure of N floating-CA paths through the
gate, against the same substitution straight from the binary cache.

    .venv/bin/python bench/gate_nix.py [--steps 600] [--runs 3] [--workdir DIR]

A builder store (``secret-key-files`` set, so Nix signs narinfos and realisations) builds a
closure shaped like a package set: N floating content-addressed steps, each writing the
paths of its inputs into its output (so every output refers to its inputs), under one
aggregate. Every step is signed into a file trace store, and ``nix copy`` fills a file
binary cache with the outputs and the realisations. Then, for each run, two fresh consumer
stores instantiate the closure and substitute it with ``nix-build --max-jobs 0`` (they may
not build anything):

- **direct**: the cache is the substituter, its key trusted;
- **http**: the same cache served over HTTP on 127.0.0.1 by nginx (when it is installed;
  else by tests/cacheserver.py), its key trusted: what Nix's own HTTP substitution costs,
  with no check at all;
- **gate**: a ``tracehook gate`` (a subprocess, a fresh ``--cache-dir``: every decision
  cold) is the only substituter, only its key trusted; as configured by default
  (``--nar-urls direct``: its narinfos name the cache's NAR files by ``file://`` URLs, so
  Nix reads the NARs itself and checks them against the NarHash the gate signed);
- **gate-nars**: the same with ``--nar-urls gate``: every NAR streamed by the gate too.

With ``--order`` the gates write their log file and the benchmark prints what Nix asked
each, in order: Nix 2.26 asks for the top step's realisation, then for every path's narinfo
(it follows the top path's references; the gate's realisation names no dependent
realisations, so no other realisation is asked for). ``bench/gate_scale.py --pattern nix``
asks in that order.

Each substituter is started before the consumer instantiates the closure, as a gate service
already runs when ``nix-instantiate`` writes the .drv files (the gate's index reads them as
they are written: it watches the store directory; ``--start-after-instantiate``: after, so
the index is built at the first request); the timed part is ``nix-build --max-jobs 0``
alone, after an ``os.sync()`` (nothing written before is still being written back while it
runs). A gate started before the instantiation decides the closure while it is written
(verifying ahead, ``tracehook gate --verify-ahead``, on by default): its decisions are then
made before the timed part, as a gate service makes them while ``nixos-rebuild``
instantiates. ``--gate-flag=--verify-ahead=0`` keeps every decision on the clock
(``--gate-flag`` passes any flag to the gates). Every consumer runs with Nix's default
narinfo-cache settings (an empty cache directory, so nothing is known before the run) and
``fsync-metadata = false`` (``--fsync``: Nix's default). The order of the modes rotates from
run to run (the machine drifts). Prints the four wall times per run, the gates' ratios to
direct and to http, and the median and spread of each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from gate import free_port  # noqa: E402
from gate_scale import wait_ready  # noqa: E402

from gatekit import key, sign_closure, write_gate_key, write_policy  # noqa: E402
from nixharness import NixEnv, get_tier  # noqa: E402
from tracehook.stores.eventlog import read_events  # noqa: E402
from tracehook.trace import crypto  # noqa: E402

# The test harness turns Nix's narinfo cache off (its stores are reused between tests); a
# consumer runs with Nix's defaults: a narinfo it has read is kept (in a fresh, empty cache
# directory here, so every run starts cold). Its store database is not fsynced (unless
# --fsync): every mode pays the same fsyncs, and on these VMs their latency is the disk's
# noise, not the substitution's cost (measured: direct 0.95 to 3.09 s across runs with it).
NIX_DEFAULTS = {
    "narinfo_cache_positive_ttl": "2592000",
    "narinfo_cache_negative_ttl": "3600",
    "fsync_metadata": "false",
}

NGINX_CONF = """daemon off;
{user}worker_processes 1;
pid {state}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on; tcp_nodelay on; keepalive_requests 100000;
  client_body_temp_path {state}; proxy_temp_path {state}; fastcgi_temp_path {state};
  uwsgi_temp_path {state}; scgi_temp_path {state};
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""

TRACEHOOK = str(Path(sys.executable).parent / "tracehook")
MODES = ("direct", "http", "gate", "gate-nars")

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
    ap.add_argument(
        "--workdir",
        type=Path,
        help="keep the built closure, the cache and the "
        "traces here, and reuse them when they are there (default: a temporary "
        "directory)",
    )
    ap.add_argument(
        "--fsync", action="store_true",
        help="consumers fsync their store database (Nix's default fsync-metadata = true)",
    )
    ap.add_argument(
        "--gate-prefix", default="", help="words put before the gate's command (e.g. a profiler)"
    )
    ap.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES),
        help="which substitutions to time (default: all; direct is always one of them)",
    )
    ap.add_argument(
        "--order", action="store_true",
        help="also print what Nix asked each gate, in order (from the gate's log file, which "
        "the gate then writes: a line an answer, a few per cent of its time)",
    )
    ap.add_argument(
        "--gate-flag", action="append", default=[], metavar="FLAG",
        help="a flag for every gate this starts, e.g. --gate-flag=--verify-ahead=0 (repeat "
        "for more)",
    )
    ap.add_argument(
        "--start-after-instantiate", action="store_true",
        help="start each substituter after the consumer instantiated the closure (default: "
        "before, as a gate service runs while nix-instantiate writes the .drv files it will "
        "be asked about)",
    )
    args = ap.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args, args.workdir.resolve())
        return
    with tempfile.TemporaryDirectory(prefix="tracehook-gate-nix-") as d:
        run(args, Path(d))


def run(args: argparse.Namespace, tmp: Path) -> None:
    tier = get_tier("2.26")
    cache_key = key("cache-1")
    cache = tmp / "cache"
    traces = tmp / "traces"
    done = tmp / f"built-{args.steps}"
    if not done.exists():
        for old in (tmp / "builder", cache, traces):
            shutil.rmtree(old, ignore_errors=True)
        sec = tmp / "cache-1.secret"
        sec.write_text(crypto.format_secret_key(cache_key))
        builder = NixEnv(tier, tmp / "builder")
        builder.configure(secret_key_files=str(sec), max_jobs="4")
        top = instantiate_all(builder, args.steps)
        t, res = nix_build(builder, args.steps)
        if res.returncode != 0:
            raise SystemExit(f"build failed: {res.stderr[-2000:]}")
        print(f"built {args.steps} steps in {t:.1f} s", flush=True)
        sign_closure(builder, [top], key("builderA"), traces)
        drvs = subprocess.run(
            [str(tier.bindir / "nix-store"), "--query", "--requisites", top],
            env=builder.env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
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
        done.touch()
    policy = write_policy(tmp / "policy.toml", traces, '"builderA"', ["builderA"])
    gate_key, gate_pub = write_gate_key(tmp)
    cache_pub = crypto.format_public_key(cache_key.public)
    server = "nginx" if shutil.which("nginx") else "python"
    times: dict[str, list[float]] = {m: [] for m in MODES if m in args.modes or m == "direct"}
    print(f"http: the cache served by {server}")
    print(f"{'run':>4} " + " ".join(f"{m + ' s':>12}" for m in times)
          + " " + " ".join(f"{m + '/direct':>17}" for m in times if m != "direct"))
    consumer = {**NIX_DEFAULTS, **({"fsync_metadata": "true"} if args.fsync else {})}
    for n in range(args.runs):
        modes = list(times)
        for mode in modes[n % len(modes):] + modes[:n % len(modes)]:  # no mode always first
            env = NixEnv(tier, tmp / f"{mode}{n}")
            env.configure(**consumer)
            (env.root / "nix" / "store").mkdir(parents=True, exist_ok=True)
            if args.start_after_instantiate:
                instantiate_all(env, args.steps)
            with substituter(mode, tmp, n, cache, policy, gate_key, env, args) as url:
                if not args.start_after_instantiate:
                    instantiate_all(env, args.steps)  # the gate runs meanwhile, as a service
                os.sync()  # nothing written before is still being written back meanwhile
                env.configure(
                    substituters=url,
                    trusted_public_keys=gate_pub if mode.startswith("gate") else cache_pub,
                )
                elapsed, res = nix_build(env, args.steps, "--max-jobs", "0")
            if res.returncode != 0:
                raise SystemExit(f"substitution ({mode}) failed: {res.stderr[-2000:]}")
            times[mode].append(elapsed)
            shutil.rmtree(env.base, ignore_errors=True)
        last = {m: t[-1] for m, t in times.items()}
        print(f"{n:>4} " + " ".join(f"{t:>12.2f}" for t in last.values()) + " "
              + " ".join(f"{t / last['direct']:>17.2f}" for m, t in last.items()
                         if m != "direct"), flush=True)
    for gate, base in (("gate", "direct"), ("gate", "http"), ("gate-nars", "direct"),
                       ("gate-nars", "http"), ("http", "direct")):
        if gate not in times or base not in times:
            continue
        ratios = [g / b for g, b in zip(times[gate], times[base], strict=True)]
        print(
            f"ratio {gate}/{base}: median {statistics.median(ratios):.2f} "
            f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {len(ratios)} runs of "
            f"{args.steps + 1} paths"
        )


@contextlib.contextmanager
def substituter(
    mode: str,
    tmp: Path,
    n: int,
    cache: Path,
    policy: Path,
    gate_key: Path,
    env: NixEnv,
    args: argparse.Namespace,
) -> Iterator[str]:
    """The substituter URL for ``mode``, with its server running meanwhile."""
    if mode == "direct":
        yield f"file://{cache}"
        return
    port = free_port()
    state = tmp / f"{mode}-state{n}"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    if mode.startswith("gate"):
        argv = [
            *args.gate_prefix.split(),
            TRACEHOOK,
            "gate",
            "--policy",
            str(policy),
            "--upstream",
            f"file://{cache}",
            "--store",
            str(env.root),
            "--listen",
            f"127.0.0.1:{port}",
            *(("--log-file", str(state / "gate.log")) if args.order else ("--quiet",)),
            "--signing-key",
            str(gate_key),
            "--cache-dir",
            str(state / "cache"),
            "--nar-urls",
            "gate" if mode == "gate-nars" else "direct",
            *args.gate_flag,
        ]
    elif shutil.which("nginx"):
        conf = state / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""  # the work dir may be 0700
        conf.write_text(NGINX_CONF.format(user=user, state=state, port=port, root=cache))
        argv = ["nginx", "-c", str(conf), "-e", str(state / "error.log")]
    else:
        argv = [sys.executable, str(REPO / "tests" / "cacheserver.py"), str(cache), str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if (state / "gate.log").exists():
            print(f"{mode} run {n}: Nix asked the gate for {asked_in_order(state / 'gate.log')}")
        shutil.rmtree(state, ignore_errors=True)


def asked_in_order(log: Path) -> str:
    """What a gate was asked, in order, from its log's answer lines: runs of one kind of
    request ("1 realisation, then 601 narinfos")."""
    kinds: list[str] = []
    counts: list[int] = []
    for record in read_events(log):
        kind = record.get("request")
        if record.get("event") != "gate" or not isinstance(kind, str):
            continue
        if kinds and kinds[-1] == kind:
            counts[-1] += 1
        else:
            kinds.append(kind)
            counts.append(1)
    return ", then ".join(f"{count} {kind}{'s' if count != 1 else ''}"
                          for count, kind in zip(counts, kinds, strict=True)) or "nothing"


if __name__ == "__main__":
    main()
