"""Helpers for the gate's tests: builders that sign, caches, policies, a gate in a thread.

A *builder* is a real Nix store that builds the test derivations. Its traces are signed by
the real post-build hook (:func:`use_hook`, then ``tracehook publish``), or, for a second
builder, with the signer's library (:func:`sign_closure`: :func:`tracehook.signer.examine.examine` +
:func:`tracehook.signer.examine.sign`, what the hook runs). Outputs are copied with
``nix copy --to file://CACHE`` (with the realisations of the named derivations on Nix 2.26).
:func:`make_synthetic` builds a small store, cache and trace store by hand, without Nix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from nixharness import REPO, NixEnv
from testkeys import public_text, secret
from tracehook.cli.demo import tamper_trace_file
from tracehook.gate.config import GateConfig, build_server
from tracehook.gate.front import GateHTTPServer, HttpLimits, bound_port, serve_in_thread
from tracehook.gate.memo import CacheConfig
from tracehook.nix import narinfo, nixbase32
from tracehook.nix.derivation import Derivation, DerivationOutput, encode_drv, serialize
from tracehook.nix.derivation_hash import input_addressed_paths, realisation_ids
from tracehook.nix.nar import format_nar_hash
from tracehook.nix.storepath import (
    derivation_path,
    hash_part,
    hash_placeholder,
    make_fixed_output_path,
)
from tracehook.signer import examine
from tracehook.stores.eventlog import EventLog
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.tracestore import FileTraceStore
from tracehook.trace import crypto
from tracehook.trace.claim import OutputClaim, sign_trace
from tracehook.trace.stepkey import step_key

BUILDER_INFO = examine.builder_info("nix", "2.26.3")


key = secret  # the suite's one key helper (tests/testkeys.py)


@dataclass(frozen=True)
class Signed:
    """What a builder signed: drv path -> (drv name, trace key)."""

    steps: dict[str, tuple[str, str]]

    def key_of(self, drv_name: str) -> str:
        found = [k for n, k in self.steps.values() if n == drv_name]
        assert len(found) == 1, (drv_name, self.steps)
        return found[0]


def built_steps(env: NixEnv, drv_paths: Sequence[str]) -> list[examine.BuildStep]:
    """Every built step in the closures of ``drv_paths`` that the signer signs, once each,
    as the signer's own library examines it (what the post-build hook runs)."""
    reader = StoreReader(str(env.root))
    local = examine.LocalStore(str(env.root))
    seen: set[str] = set()
    steps: list[examine.BuildStep] = []
    try:
        for root in drv_paths:
            for drv_path in reader.load_closure(root):
                if drv_path in seen:
                    continue
                seen.add(drv_path)
                step = examine.examine(local, drv_path)
                if not isinstance(step, examine.Skipped):
                    steps.append(step)
    finally:
        local.close()
    return steps


def _signed(steps: Sequence[examine.BuildStep]) -> Signed:
    return Signed({s.drv_path: (s.drv.name, s.resolution.key.key) for s in steps})


def sign_closure(env: NixEnv, drv_paths: Sequence[str], sk: crypto.SecretKey,
                 traces: Path) -> Signed:
    """Sign every built step in the closures of ``drv_paths`` into the trace store."""
    store = FileTraceStore(f"file://{traces}", traces)
    steps = built_steps(env, drv_paths)
    for step in steps:
        store.append(step.resolution.key.key, [examine.sign(step, sk, BUILDER_INFO)])
    return _signed(steps)


def use_hook(env: NixEnv, sk: crypto.SecretKey, traces: Path, tmp: Path) -> Path:
    """Make ``env`` sign every build with the real post-build hook (hooks/post-build, in its
    own process) into a spool that ``tracehook publish --config CONFIG`` sends to ``traces``.
    Returns CONFIG."""
    tmp.mkdir(parents=True, exist_ok=True)
    secret_path = tmp / "builder.secret"
    secret_path.write_text(crypto.format_secret_key(sk))
    config = tmp / "sign.toml"
    config.write_text(
        f'secret-key-file = "{secret_path}"\n'
        f'publish-to = ["file://{traces}"]\n'
        f'spool-dir = "{tmp / "spool"}"\n'
        f'log-file = "{tmp / "sign.log"}"\n'
        "strict = true\n"
    )
    env.configure(post_build_hook=str(REPO / "hooks" / "post-build"))
    env.extra_env["TRACEHOOK_CONFIG"] = str(config)
    env.extra_env["TRACEHOOK_AGENT_SOCKET"] = "off"
    return config


def step_keys(env: NixEnv, drv_paths: Sequence[str]) -> Signed:
    """The trace key of every built step in the closures (what the signer computes)."""
    return _signed(built_steps(env, drv_paths))


def copy_to_cache(env: NixEnv, cache: Path, drv_paths: Sequence[str],
                  out_paths: Sequence[str]) -> None:
    """``nix copy`` the outputs (and, on 2.26, the realisations of ``drv_paths``)."""
    installables = list(out_paths)
    if env.tier.name != "2.8":
        installables += [f"{d}^*" for d in drv_paths]
    env.run("nix", "copy", "--to", f"file://{cache}", *installables)


def write_policy(path: Path, traces: Path, require: str,
                 keys: Mapping[str, str] | Sequence[str]) -> Path:
    """``keys``: names, or name -> extra inline TOML fields (``revoked = true``)."""
    lines = [f"traces = {json.dumps([f'file://{traces}'])}", "", "[keys]"]
    items = keys.items() if isinstance(keys, Mapping) else ((k, "") for k in keys)
    for name, extra in items:
        inner = f'key = "{public_text(name)}"' + (f", {extra}" if extra else "")
        lines.append(f"{name} = {{ {inner} }}")
    lines += ["", "[trust]", f"require = {require}", ""]
    path.write_text("\n".join(lines))
    return path


def tamper_trace(traces: Path, trace_key: str) -> None:
    """Change one byte of the claimed NAR hash in every signature of a trace; keep the
    signatures (so they no longer verify)."""
    tamper_trace_file(traces / "traces" / trace_key)


def copy_traces(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@dataclass
class RunningGate:
    server: GateHTTPServer
    url: str
    log_file: Path

    def events(self) -> list[dict[str, object]]:
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines() if line]

    def refusals(self) -> list[dict[str, object]]:
        return [e for e in self.events() if e.get("outcome") == "refused"]


@contextlib.contextmanager
def running_gate(
    policy: Path, upstreams: Sequence[str], store_root: str | None, log_file: Path,
    signing_key: Path | None = None, cache: CacheConfig | None = None,
    http: HttpLimits | None = None, upstream_timeout: float = 2.0,
    stderr: TextIO | None = None, journal: bool = False, **config: Any,
) -> Iterator[RunningGate]:
    """``stderr``: where the human log lines go (default: nowhere), each followed by a TAB
    and the JSON record with ``journal`` (as ``tracehook gate`` writes them); ``config``:
    more GateConfig fields (``verify_deadline``, ``cache_dir``, ...)."""
    cfg = GateConfig(policy=policy, upstreams=tuple(upstreams), port=0,
                     signing_key=signing_key, store_root=store_root, log_file=log_file,
                     cache=cache or CacheConfig(), http=http or HttpLimits(),
                     upstream_timeout=upstream_timeout, **config)
    server = build_server(cfg, EventLog(log_file, prefix="tracehook-gate", stderr=stderr,
                                        journal=journal))
    serve_in_thread(server)
    try:
        yield RunningGate(server, f"http://127.0.0.1:{bound_port(server)}", log_file)
    finally:
        server.shutdown()
        server.server_close()
        if server.warm is not None:
            server.warm.close()  # (a gate process keeps its answers: cli/gate.py)
        server.service.verifier.close()


def write_gate_key(dir: Path, name: str = "gate-1") -> tuple[Path, str]:
    """(secret key file, public key text) for the gate."""
    sk = key(name)
    path = dir / f"{name}.secret"
    path.write_text(crypto.format_secret_key(sk))
    return path, crypto.format_public_key(sk.public)


# --------------------------------------------------------------- synthetic, without Nix


@dataclass(frozen=True)
class Synthetic:
    """A chroot store with two hand-written derivations, their traces, and a file cache.

    ``ia``: an input-addressed derivation (its output path is in the .drv);
    ``ca``: a floating content-addressed one (realisation id ``ca_id``).
    """

    root: Path
    cache: Path
    traces: Path
    policy: Path
    ia_drv: str
    ia_out: str
    ca_drv: str
    ca_out: str
    ca_id: str
    nar_url: str  # the ia output's NAR in the cache
    nar_data: bytes


def _write_drv(root: Path, drv: Derivation) -> str:
    path = derivation_path(drv)
    real = Path(str(root) + path)
    real.parent.mkdir(parents=True, exist_ok=True)
    real.write_bytes(encode_drv(serialize(drv)))
    return path


def _publish(cache: Path, out: str, data: bytes, ca: str | None = None) -> tuple[str, bytes]:
    digest = hashlib.sha256(data).digest()
    file = f"nar/{nixbase32.encode(digest)}.nar"
    (cache / "nar").mkdir(parents=True, exist_ok=True)
    (cache / file).write_bytes(data)
    ni = narinfo.NarInfo(store_path=out, nar_hash=format_nar_hash(digest), nar_size=len(data),
                         url=file, compression="none", ca=ca)
    (cache / f"{hash_part(out)}.narinfo").write_text(narinfo.render(ni))
    return file, digest


def make_synthetic(base: Path, signer_name: str = "builderA", tag: str = "") -> Synthetic:
    """Called again with the same ``base`` and another ``tag``, it adds two more
    derivations to the same store, cache and trace store."""
    root, cache, traces = base / "store", base / "cache", base / "traces"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\n")
    env = {"builder": "/bin/sh", "name": f"hello{tag}", "system": "x86_64-linux"}
    blank = Derivation({"out": DerivationOutput("", "", "")}, {}, (), "x86_64-linux",
                       "/bin/sh", ("-c", "echo hello"), {**env, "out": ""})
    ia_out = input_addressed_paths(blank)["out"]
    ia = replace(blank, outputs={"out": DerivationOutput(ia_out, "", "")},
                 env={**env, "out": ia_out})
    ia_drv = _write_drv(root, ia)
    ca = Derivation({"out": DerivationOutput("", "r:sha256", "")}, {}, (), "x86_64-linux",
                    "/bin/sh", ("-c", "echo ca"),
                    {**env, "name": f"hello-ca{tag}", "out": hash_placeholder("out")})
    ca_drv = _write_drv(root, ca)
    ca_id = realisation_ids(ca)["out"]
    ca_data = b"ca output NAR" + tag.encode()
    ca_out = make_fixed_output_path("nar", "sha256", hashlib.sha256(ca_data).digest(),
                                    f"hello-ca{tag}")
    ia_data = b"ia output NAR " * 100 + tag.encode()
    nar_url, ia_hash = _publish(cache, ia_out, ia_data)
    _, ca_hash = _publish(cache, ca_out, ca_data)
    store = FileTraceStore(f"file://{traces}", traces)
    sk = key(signer_name)
    for drv, out, digest in ((ia, ia_out, ia_hash), (ca, ca_out, ca_hash)):
        res = step_key(drv, {})
        token = sign_trace(sk, res.key, {"out": OutputClaim(out, digest)}, BUILDER_INFO,
                           drv.name)
        store.append(res.key.key, [token])
    policy = write_policy(base / "policy.toml", traces, '"builderA"', ["builderA"])
    return Synthetic(root, cache, traces, policy, ia_drv, ia_out, ca_drv, ca_out, ca_id,
                     nar_url, ia_data)
