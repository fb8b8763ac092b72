"""Start-up cost: what every ``tracehook`` command and every build pays before any work.

    .venv/bin/python bench/start.py [--runs 30]

Times, alternating, ``--runs`` runs of each (wall time of the whole process, as a shell
sees it), all with the virtualenv's interpreter:

- **python -c pass**: the bare interpreter, the baseline;
- **tracehook --version** and **tracehook --help**;
- **hook client, agent running**: the post-build hook's entry point
  (``tracehook.signer.agent_client``, what ``hooks/post-build`` runs) handing a real build
  (a derivation Nix 2.26 built in a throwaway store, already signed once) to a running
  signing agent over its Unix socket: the hook's fast path, round trip included.

Prints the median and spread of each and its ratio to the bare interpreter's median (the
target: at most 3x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from nixharness import NixEnv, get_tier  # noqa: E402
from tracehook.signer import config  # noqa: E402
from tracehook.signer.agent import SigningAgent  # noqa: E402
from tracehook.trace import crypto  # noqa: E402

PY = sys.executable
TRACEHOOK = str(Path(PY).parent / "tracehook")
ONE_NIX = """\
let busybox = builtins.path { path = ./bb; name = "busybox-static"; };
in derivation {
  name = "start-bench";
  system = builtins.currentSystem;
  builder = "${busybox}/busybox";
  args = [ "sh" "-c" "echo start > $out" ];
}
"""


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tracehook-bench-start-") as tmp:
        base = Path(tmp)
        env = NixEnv(get_tier("2.26"), base / "nix")
        (env.exprs / "one.nix").write_text(ONE_NIX)
        out = env.run("nix-build", "--no-out-link", str(env.exprs / "one.nix")).stdout.split()[-1]
        drv = env.run("nix-store", "--query", "--deriver", out).stdout.strip()
        sk = crypto.generate_secret_key("bench-1")
        crypto.write_key_files(sk, base / "key.sec", base / "key.pub")
        sign_toml = base / "sign.toml"
        sign_toml.write_text(
            f'secret-key-file = "{base / "key.sec"}"\n'
            f'publish-to = ["file://{base / "traces"}"]\n'
            f'spool-dir = "{base / "spool"}"\nlog-file = "{base / "sign.log"}"\n'
            f'store-root = "{env.root}"\n'
        )
        sock = base / "agent.sock"
        agent = SigningAgent(sock, config.load(sign_toml, environ={}), env.env())
        agent.start()
        plain = {k: v for k, v in os.environ.items() if not k.startswith("TRACEHOOK_")}
        hook_env = {
            **plain,
            "TRACEHOOK_CONFIG": str(sign_toml),
            "TRACEHOOK_AGENT_SOCKET": str(sock),
            "DRV_PATH": drv,
            "OUT_PATHS": out,
        }
        commands = {
            "python -c pass": ([PY, "-c", "pass"], plain),
            "tracehook --version": ([TRACEHOOK, "--version"], plain),
            "tracehook --help": ([TRACEHOOK, "--help"], plain),
            "hook client, agent running": (
                [PY, "-c", "from tracehook.signer.agent_client import run; run()"],
                hook_env,
            ),
        }
        try:
            for argv_, env_ in commands.values():  # warm-up: .pyc files, the first signature
                timed(argv_, env_)
            times: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(args.runs):
                for name, (argv_, env_) in commands.items():
                    times[name].append(timed(argv_, env_))
        finally:
            agent.stop()
        events = [
            json.loads(line)
            for line in (base / "sign.log").read_text().splitlines()
            if line.startswith("{")
        ]
        via = {e.get("via") for e in events if e.get("event") == "sign"}
        if via != {"agent"}:
            raise SystemExit(f"the hook did not always go through the agent: {via}")
    bare = statistics.median(times["python -c pass"])
    print(f"{'command':<28} {'median ms':>10} {'min':>7} {'max':>7} {'ratio':>6}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:<28} {med * 1000:>10.1f} {min(ts) * 1000:>7.1f} {max(ts) * 1000:>7.1f} "
            f"{med / bare:>6.2f}"
        )
    print(f"({args.runs} runs each, alternating; ratio: median over the bare interpreter's)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
