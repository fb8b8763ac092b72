"""What the post-build hook adds to every build, measured with real Nix.

    .venv/bin/python bench/hook_overhead.py [--builds 20] [--repeats 5] [--tier 2.26] [--ca]

Three isolated stores on the same Nix build the same N small independent derivations in
one ``nix-build`` each, in turn, with a fresh salt every repeat so that nothing is cached:
one without a hook (the baseline), one with ``post-build-hook = hooks/post-build`` talking
to a running signing agent (as deployed with ``tracehook publish --daemon``), and one with
the hook signing in its own process (no agent running). Both hooked stores sign every build
into a local spool. Prints the wall time of each run, the added time per build (median over
the repeats) and the ratio to the baseline. Target: at most 40 ms added per build.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from nixharness import NixEnv, get_tier  # noqa: E402
from tracehook.signer import config  # noqa: E402
from tracehook.signer.agent import SigningAgent  # noqa: E402
from tracehook.trace import crypto  # noqa: E402

BENCH_NIX = """\
{ n, salt, ca ? false }:
let
  busybox = builtins.path { path = ./bb; name = "busybox-static"; };
  caAttrs = if ca then {
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  } else { };
in builtins.genList (i: derivation ({
  name = "bench-${toString i}";
  system = builtins.currentSystem;
  inherit salt;
  builder = "${busybox}/busybox";
  args = [ "sh" "-c" "echo ${toString i} ${salt} > $out" ];
} // caAttrs)) n
"""


def make_env(base: Path, tier_name: str, hooked: bool, agent: Path | None = None) -> NixEnv:
    env = NixEnv(get_tier(tier_name), base)
    (env.exprs / "bench.nix").write_text(BENCH_NIX)
    if hooked:
        sk = crypto.generate_secret_key("bench-1")
        crypto.write_key_files(sk, base / "key.sec", base / "key.pub")
        config = base / "sign.toml"
        config.write_text(
            f'secret-key-file = "{base / "key.sec"}"\n'
            f'publish-to = ["file://{base / "traces"}"]\n'
            f'spool-dir = "{base / "spool"}"\nlog-file = "{base / "sign.log"}"\n'
            f'store-root = "{env.root}"\n'  # the agent never sees NIX_CONFIG's store
        )
        env.configure(post_build_hook=str(REPO / "hooks" / "post-build"))
        env.extra_env["TRACEHOOK_CONFIG"] = str(config)
        env.extra_env["TRACEHOOK_AGENT_SOCKET"] = str(agent) if agent else "off"
    return env


def timed_build(env: NixEnv, n: int, salt: str, ca: bool) -> float:
    args = ["--no-out-link", str(env.exprs / "bench.nix"), "--arg", "n", str(n),
            "--argstr", "salt", salt]
    if ca:
        args += ["--arg", "ca", "true"]
    start = time.monotonic()
    res = env.run("nix-build", *args, timeout=900)
    elapsed = time.monotonic() - start
    built = [line for line in res.stdout.split() if line.startswith("/")]
    if len(built) != n:
        raise SystemExit(f"expected {n} outputs, got {len(built)}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--builds", type=int, default=20, help="derivations per run (N)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tier", default="2.26", choices=["2.26", "2.8"])
    ap.add_argument("--ca", action="store_true", help="floating content-addressed derivations")
    args = ap.parse_args(argv)
    n = args.builds
    with tempfile.TemporaryDirectory(prefix="tracehook-bench-") as tmp:
        root = Path(tmp)
        sock = root / "agent.sock"
        envs = {
            "no hook": make_env(root / "plain", args.tier, hooked=False),
            "hook + agent": make_env(root / "agent", args.tier, hooked=True, agent=sock),
            "hook, in process": make_env(root / "cold", args.tier, hooked=True),
        }
        agent = SigningAgent(sock, config.load(root / "agent" / "sign.toml", environ={}),
                             envs["hook + agent"].env())
        agent.start()
        try:
            for env in envs.values():  # warm-up: evaluation, busybox in the store, .pyc files
                timed_build(env, 1, "warmup", args.ca)
            times: dict[str, list[float]] = {name: [] for name in envs}
            kind = "CA" if args.ca else "IA"
            print(f"Nix {args.tier}, {n} {kind} derivations per run, {args.repeats} repeats")
            for r in range(args.repeats):
                salt = uuid.uuid4().hex
                line = []
                for name, env in envs.items():
                    times[name].append(timed_build(env, n, salt, args.ca))
                    line.append(f"{name} {times[name][-1]:6.2f} s")
                print(f"repeat {r + 1}: " + ", ".join(line))
        finally:
            agent.stop()
        base = times["no hook"]
        for name in ("hook + agent", "hook, in process"):
            added = [(h - b) / n * 1000 for h, b in zip(times[name], base, strict=True)]
            ratio = statistics.median(h / b for h, b in zip(times[name], base, strict=True))
            spooled = len(list((envs[name].base / "spool" / "pending").iterdir()))
            print(f"{name}: median added time per build {statistics.median(added):.1f} ms "
                  f"(ratio to no hook {ratio:.2f}; {spooled} traces spooled); target <= 40 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
