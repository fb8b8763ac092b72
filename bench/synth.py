"""A synthetic closure shaped like a package set, for the benchmarks.

``generate(tmp, steps)`` writes, under ``tmp``:

- ``store/nix/store/*.drv``: a chroot-style store with 20 fixed-output sources and
  ``steps`` floating-CA build steps, each taking 1 to 5 inputs picked from earlier steps
  with a bias to recent ones (a wide graph a few dozen steps deep), and aggregate steps of
  up to 8 inputs (like buildEnv) gathering the leaves until one target remains;
- ``traces/traces/<key>``: a file trace store, every step signed by two builders;
- ``cache/``: a file binary cache with a narinfo for every output (NAR hash as attested)
  and for every source (with its ``CA`` pin), as ``nix copy`` writes them (NARs absent).

``changed="pkg-N"`` changes that build step (its name, so its derivation): it and every
step above it get new paths, the rest stay as they are (the last ordinary step,
``pkg-<steps - steps // 50 - 1>``, has only the aggregates above it). Keys are fixed test
keys from tests/testkeys.py (never real secrets).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tracehook.nix import nixbase32
from tracehook.nix.derivation import Derivation, DerivationOutput, encode_drv, serialize
from tracehook.nix.derivation_hash import DrvHash, realisation_ids
from tracehook.nix.nar import format_nar_hash
from tracehook.nix.storepath import (
    derivation_path,
    hash_part,
    make_fixed_output_path,
    make_store_path,
    upstream_placeholder,
)
from tracehook.trace import crypto
from tracehook.trace.claim import BuilderInfo, OutputClaim, sign_trace
from tracehook.trace.stepkey import InputOutput, step_key

# The suite's one key helper (a name means the same key everywhere: laut's for builderA and
# builderB), also when a benchmark imports this module.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from testkeys import secret

BUILDER = BuilderInfo(1, "/nix/store", "nix", "2.26.3")
SIGNERS = ("builderA", "builderB")



def policy_text(traces: Path, require: str = '{ all-of = ["builderA", "builderB"] }') -> str:
    keys = "".join(f'{n} = "{crypto.format_public_key(secret(n).public)}"\n'
                   for n in SIGNERS)
    return f'traces = ["file://{traces}"]\n\n[keys]\n{keys}\n[trust]\nrequire = {require}\n'


@dataclass
class Closure:
    root: Path  # the chroot-style store root
    traces: Path  # the trace store
    cache: Path  # the binary cache
    target: str  # the drv path whose closure holds every step
    steps: list[tuple[str, str]] = field(default_factory=list)  # (drv, out) per build step
    sources: list[tuple[str, str]] = field(default_factory=list)  # (drv, out) per source
    realisation_ids: dict[str, str] = field(default_factory=dict)  # drv -> id of "out"

    def requests(self, only: set[str] | None = None) -> list[tuple[str, str]]:
        """What Nix asks a gate for each path of the closure: (realisation, narinfo); with
        ``only``, for those build steps alone (what Nix asks when it has the rest)."""
        out = [(f"/realisations/{self.realisation_ids[d]}.doi", f"/{hash_part(o)}.narinfo")
               for d, o in self.steps if only is None or d in only]
        if only is not None:
            return out
        return out + [("", f"/{hash_part(o)}.narinfo") for _, o in self.sources]


def with_policy(tmp: Path, steps: int) -> tuple[Closure, Path]:
    """A closure of ``steps`` build steps under ``tmp`` and its 2-of-2 policy,
    ``tmp/policy.toml``."""
    closure = generate(tmp, steps)
    policy = tmp / "policy.toml"
    policy.write_text(policy_text(closure.traces))
    return closure, policy


def generate(tmp: Path, steps: int, seed: int = 1, changed: str | None = None,
             store: Path | None = None) -> Closure:
    if steps < 2:  # (one ordinary step and the aggregate above it, at least)
        raise ValueError(f"a synthetic closure has at least 2 steps, not {steps}")
    rng = random.Random(seed)
    root = store or tmp / "store"
    store_dir = root / "nix" / "store"
    store_dir.mkdir(parents=True, exist_ok=True)
    keys = [secret(n) for n in SIGNERS]
    traces_dir = tmp / "traces"
    cache = tmp / "cache"
    (traces_dir / "traces").mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\n")
    drvs: dict[str, Derivation] = {}
    hashes: dict[str, DrvHash] = {}
    closure = Closure(root, traces_dir, cache, "")

    def write(drv: Derivation) -> str:
        path = derivation_path(drv)
        drvs[path] = drv
        (store_dir / path.rsplit("/", 1)[1]).write_bytes(encode_drv(serialize(drv)))
        return path

    def narinfo(out: str, nar: bytes, ca: str | None = None) -> None:
        lines = [f"StorePath: {out}", f"URL: nar/{nixbase32.encode(nar)}.nar",
                 "Compression: none", f"NarHash: {format_nar_hash(nar)}", "NarSize: 1024",
                 "References: "]
        if ca:
            lines.append(f"CA: {ca}")
        (cache / f"{hash_part(out)}.narinfo").write_text("\n".join(lines) + "\n")

    def step(name: str, picks: list[tuple[str, str]]) -> tuple[str, str]:
        picks = sorted(set(picks))
        if name == changed:
            name += "-changed"
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
        nar = hashlib.sha256(out.encode()).digest()
        claim = {"out": OutputClaim(out, nar, references=())}  # attested: none
        tokens = [sign_trace(k, key, claim, BUILDER, name) for k in keys]
        (traces_dir / "traces" / key.key).write_text(json.dumps({"signatures": tokens}))
        narinfo(out, nar)
        closure.steps.append((drv_path, out))
        closure.realisation_ids[drv_path] = realisation_ids(drv, drvs.__getitem__, hashes)["out"]
        return drv_path, out

    sources: list[tuple[str, str]] = []
    for i in range(20):
        name = f"src-{i}.tar.gz"
        digest = hashlib.sha256(name.encode()).digest()
        out = make_fixed_output_path("flat", "sha256", digest, name)
        env = {"name": name, "out": out, "url": f"https://example.org/{name}"}
        drv = Derivation({"out": DerivationOutput(out, "sha256", digest.hex())}, {}, (),
                         "x86_64-linux", "/bin/sh", ("-c", "fetch"), env)
        sources.append((write(drv), out))
        narinfo(out, hashlib.sha256(out.encode()).digest(),
                f"fixed:sha256:{nixbase32.encode(digest)}")
    closure.sources = sources
    made: list[tuple[str, str]] = []
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
    closure.target = layer[0][0]
    return closure
