"""``tracehook demo``: the whole product end to end, with real Nix, on an embedded default.

1. Keys for a builder and for the gate (``tracehook keygen``).
2. A builder store builds a small chain (floating-CA steps and an input-addressed step on
   top) with the post-build hook configured: every build step is signed into the spool;
   ``tracehook publish`` moves the traces to a local trace store; ``nix copy`` fills a
   local binary cache.
3. A gate stands in front of that cache under a policy that trusts the builder's key; a
   fresh consumer store, whose only substituter is the gate and which trusts only the
   gate's key, substitutes the whole chain with ``--max-jobs 0`` (it may not build).
4. One trace in the middle of the chain is tampered with; a second fresh consumer asks
   again, the gate refuses, Nix cannot substitute, and ``tracehook log --refused`` says
   which step and why.

Everything lives under one work directory (printed; kept for inspection). Exit 0 when
every step behaved as described, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tracehook.errors import EXIT_OK, EXIT_REFUSED, EnvironmentFault
from tracehook.stores import proc

DEMO_NIX = r"""
# tracehook's demo: a floating content-addressed chain with an input-addressed step on top.
{ bb ? ./bb }:
let
  busybox = builtins.path { path = bb; name = "busybox-static"; };
  step = name: ca: deps: derivation ({
    inherit name deps;
    system = builtins.currentSystem;
    builder = "${busybox}/busybox";
    args = [ "sh" "-eu" "-c" ''
      echo "${name}" > $out
      for d in $deps; do ${busybox}/busybox cat $d >> $out; done
    '' ];
  } // (if ca then {
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  } else { }));
  compiler = step "demo-compiler" true [ ];
  library = step "demo-library" true [ compiler ];
  app = step "demo-app" true [ library compiler ];
  bundle = step "demo-bundle" false [ app ];
in { inherit compiler library app bundle; }
"""


# The oldest Nix the demo (and tracehook) supports, and the first whose CLI names a
# derivation's outputs as DRV^* (older ones cannot copy realisations by name; the gate
# answers realisations from the traces, so the demo does without them there).
MIN_NIX = (2, 8)
CARET_OUTPUTS = (2, 13)
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Tools:
    nix_bin: Path
    nix_version: tuple[int, ...]
    tracehook: str
    hook: str

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.nix_version))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="run the end-to-end demo with real Nix (build, sign, gate, refuse)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", type=Path, help="where to put everything (default: a new "
                   "temporary directory, kept)")
    p.add_argument("--nix-bin", type=Path, default=None, help="directory with nix, nix-build, "
                   "... (default: the first nix-build on PATH, else "
                   "$TRACEHOOK_NIX_2_26_BIN; Nix 2.8 or newer)")
    p.set_defaults(func=main)


def say(text: str) -> None:
    print(text, flush=True)


def section(title: str) -> None:
    say(f"\n== {title}")


def _nix_version(nix_bin: Path) -> tuple[int, ...]:
    """``nix --version`` as numbers; EnvironmentFault (one line) if it is not Nix 2.8+."""
    res = proc.run([str(nix_bin / "nix"), "--version"], timeout=60, check=False)
    m = _VERSION.search(res.stdout)
    if res.returncode != 0 or m is None:
        raise EnvironmentFault(f"{nix_bin / 'nix'} --version did not say which Nix it is; "
                               "the demo needs Nix 2.8 or newer (pass --nix-bin DIR)")
    version = tuple(int(g) for g in m.groups() if g is not None)
    if version[:2] < MIN_NIX:
        raise EnvironmentFault(
            f"the demo needs Nix {'.'.join(map(str, MIN_NIX))} or newer; {nix_bin} has "
            f"{'.'.join(map(str, version))} (pass --nix-bin DIR, or run scripts/demo.sh)")
    return version


def _find_tools(nix_bin: Path | None) -> Tools:
    if nix_bin is None:
        found = shutil.which("nix-build")
        env_bin = os.environ.get("TRACEHOOK_NIX_2_26_BIN")
        nix_bin = Path(found).parent if found else Path(env_bin) if env_bin else None
    if nix_bin is None or not (nix_bin / "nix-build").exists() or not (nix_bin / "nix").exists():
        raise EnvironmentFault(f"no Nix found{f' in {nix_bin}' if nix_bin else ' on PATH'}: "
                               "pass --nix-bin DIR (scripts/demo.sh sets it up)")
    version = _nix_version(nix_bin)
    bindir = Path(sys.executable).parent
    tracehook = bindir / "tracehook"
    hook = bindir / "tracehook-post-build"
    for exe in (tracehook, hook):
        if not exe.exists():
            raise EnvironmentFault(f"{exe} not found: install tracehook (pip install .)")
    return Tools(nix_bin, version, str(tracehook), str(hook))


class Store:
    """One isolated Nix store with its own nix.conf."""

    def __init__(self, tools: Tools, base: Path, settings: dict[str, str]) -> None:
        self.tools, self.base, self.root = tools, base, base / "root"
        (base / "conf").mkdir(parents=True, exist_ok=True)
        (base / "home").mkdir(exist_ok=True)
        conf = {
            "experimental-features": "nix-command ca-derivations",
            "store": str(self.root), "build-users-group": "", "sandbox": "true",
            "sandbox-paths": "", "substituters": "",
            "narinfo-cache-positive-ttl": "0", "narinfo-cache-negative-ttl": "0",
        } | settings
        (base / "conf" / "nix.conf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.tools.nix_bin}:/usr/bin:/bin", "HOME": str(self.base / "home"),
            "XDG_CACHE_HOME": str(self.base / "home" / ".cache"),
            "NIX_CONF_DIR": str(self.base / "conf"), "TMPDIR": str(self.base),
            "LANG": "C.UTF-8",
        }

    def build_from(self, gate_url: str, gate_pub: str, expr: Path) -> proc.Result:
        """nix-build the demo with the gate as the only substituter, building nothing."""
        return self.nix(
            "nix-build", "--no-out-link", "--max-jobs", "0", str(expr), "-A", "bundle",
            "--option", "substituters", gate_url, "--option", "trusted-public-keys", gate_pub,
            check=False,
        )

    def nix(self, prog: str, *args: str, check: bool = True) -> proc.Result:
        return proc.run([str(self.tools.nix_bin / prog), *args], env=self.env(),
                        cwd=str(self.base), check=check, timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise EnvironmentFault(f"the gate did not answer at {url}") from None
            time.sleep(0.1)


def tamper_trace_file(trace_file: Path) -> None:
    """Change one byte of the claimed NAR hash in every signature; keep the signatures (the
    attack the demo, and the gate's tests, show being refused)."""
    doc = json.loads(trace_file.read_text())
    out = []
    for token in doc["signatures"]:
        header, payload, sig = token.split(".")
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        for claim in body["out"]["nix"].values():
            claim["hash"] = claim["hash"][:-1] + ("0" if claim["hash"][-1] != "0" else "1")
        raw = json.dumps(body, separators=(",", ":")).encode()
        out.append(f"{header}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}.{sig}")
    trace_file.write_text(json.dumps({"signatures": out}, indent=2) + "\n")


def _consumer(tools: Tools, work: Path, name: str) -> Store:
    """A fresh store that has instantiated the demo (as a user's evaluation would)."""
    store = Store(tools, work / name, {})
    store.nix("nix-instantiate", str(work / "demo.nix"), "-A", "bundle")
    return store


@contextlib.contextmanager
def _gate(argv: list[str], store: Store) -> Iterator[str]:
    """A gate in front of the cache for ``store`` (it reads that store's .drv files)."""
    port = _free_port()
    gate = proc.spawn([*argv, "--listen", f"127.0.0.1:{port}", "--store", str(store.root)],
                      stderr=None)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/nix-cache-info")
        yield url
    finally:
        gate.terminate()
        try:
            gate.wait(timeout=10)
        except subprocess.TimeoutExpired:
            gate.kill()


def run_demo(tools: Tools, work: Path) -> bool:
    th = tools.tracehook
    (work / "bb").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", work / "bb" / "busybox")
    (work / "demo.nix").write_text(DEMO_NIX)

    say(f"Nix {tools.version_text} from {tools.nix_bin}")
    section("1. keys: one for the builder, one for the gate")
    keys = work / "keys"
    keys.mkdir()
    for name in ("builder-1", "gate-1"):
        proc.run([th, "keygen", name, "--secret-key-file", str(keys / f"{name}.sec"),
                  "--public-key-file", str(keys / f"{name}.pub")])
    builder_pub = (keys / "builder-1.pub").read_text().strip()
    gate_pub = (keys / "gate-1.pub").read_text().strip()
    say(f"builder key: {builder_pub}\ngate key:    {gate_pub}")

    section("2. the builder builds, the post-build hook signs every step")
    traces, cache = work / "traces", work / "cache"
    sign_toml = work / "sign.toml"
    sign_toml.write_text(
        f'secret-key-file = "{keys / "builder-1.sec"}"\n'
        f'publish-to = ["file://{traces}"]\n'
        f'spool-dir = "{work / "spool"}"\nlog-file = "{work / "logs" / "sign.log"}"\n'
    )
    hook = work / "post-build-hook"
    hook.write_text(f"#!/bin/sh\nexport TRACEHOOK_CONFIG={sign_toml}\n"
                    f"export TRACEHOOK_AGENT_SOCKET={work / 'no-agent.sock'}\n"
                    f"exec {tools.hook}\n")
    hook.chmod(0o755)
    builder = Store(tools, work / "builder", {"post-build-hook": str(hook)})
    built = builder.nix("nix-build", "--no-out-link", str(work / "demo.nix"), "-A", "bundle")
    for line in built.stderr.splitlines():
        if line.startswith(("building", "resolved", "post-build-hook")):
            say(f"  {line}")
    out_path = built.stdout.strip().splitlines()[-1]
    say(f"built {out_path}")
    published = proc.run([th, "publish", "--config", str(sign_toml), "--no-agent"])
    say((published.stdout + published.stderr).strip())
    attrs = ("compiler", "library", "app", "bundle")
    drvs = [builder.nix("nix-instantiate", str(work / "demo.nix"), "-A", a).stdout.strip()
            for a in attrs]
    # Every step's output (built already: nix-build only names them), not only the bundle's
    # runtime closure: a consumer substituting the chain asks for each step.
    outs = builder.nix("nix-build", "--no-out-link", str(work / "demo.nix"),
                       *(arg for a in attrs for arg in ("-A", a))).stdout.split()
    if tools.nix_version[:2] >= CARET_OUTPUTS:
        builder.nix("nix", "copy", "--to", f"file://{cache}", *outs, *(f"{d}^*" for d in drvs))
        say(f"copied every step's output and its realisation to file://{cache}")
    else:  # no DRV^* here; the gate answers realisations from the verified traces
        builder.nix("nix", "copy", "--to", f"file://{cache}", *outs)
        say(f"copied every step's output to file://{cache} (Nix {tools.version_text} cannot "
            "name realisations to copy; the gate answers them from the traces)")

    section("3. a fresh store substitutes through the gate (it may not build: --max-jobs 0)")
    policy = work / "policy.toml"
    policy.write_text(f'traces = ["file://{traces}"]\n\n[keys]\nbuilder-1 = "{builder_pub}"\n\n'
                      '[trust]\nrequire = "builder-1"\n')
    gate_log = work / "logs" / "gate.log"
    gate_args = [th, "gate", "--policy", str(policy), "--upstream", f"file://{cache}",
                 "--signing-key", str(keys / "gate-1.sec"), "--log-file", str(gate_log),
                 "--quiet"]
    ok = True
    first = _consumer(tools, work, "consumer-1")
    with _gate(gate_args, first) as gate_url:
        say(f"gate on {gate_url} for {first.root}: trusts builder-1; the store trusts gate-1 only")
        got = first.build_from(gate_url, gate_pub, work / "demo.nix")
        if got.returncode == 0 and got.stdout.strip() == out_path:
            say(f"substituted {out_path} and its chain: verified by traces")
        else:
            ok = False
            say(f"UNEXPECTED: substitution failed:\n{got.stderr.strip()[-1500:]}")

    section("4. tamper with the trace of one step in the middle, and ask again")
    report = proc.run([th, "verify", drvs[1], "--policy", str(policy), "--store",
                       str(builder.root), "--json"])
    step = next(s for s in json.loads(report.stdout)["steps"] if s["name"] == "demo-library")
    trace_file = traces / "traces" / str(step["resolved_keys"][0]).split(":", 1)[1]
    tamper_trace_file(trace_file)
    say(f"changed one byte of the output hash demo-library's trace claims ({trace_file.name})")
    second = _consumer(tools, work, "consumer-2")
    with _gate(gate_args, second) as gate_url:
        refused = second.build_from(gate_url, gate_pub, work / "demo.nix")
        if refused.returncode != 0:
            say("Nix could not substitute the chain: the gate refused it")
        else:
            ok = False
            say("UNEXPECTED: the tampered chain was substituted")

    section("5. what the operator reads: tracehook log --refused")
    logs = proc.run([th, "log", "--refused", str(gate_log)], check=False)
    say(logs.stdout.strip() or "(no refusals logged)")
    if "refused" not in logs.stdout:
        ok = False
    section("result")
    say("demo OK: verified chain substituted, tampered chain refused" if ok
        else "demo FAILED: see above")
    say(f"everything is under {work}")
    return ok


def main(args: argparse.Namespace) -> int:
    tools = _find_tools(args.nix_bin)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tracehook-demo-"))
    work = work.resolve()
    if work.exists() and any(work.iterdir()):
        raise EnvironmentFault(f"{work} is not empty; give --workdir a new directory")
    work.mkdir(parents=True, exist_ok=True)
    return EXIT_OK if run_demo(tools, work) else EXIT_REFUSED
