"""Cache signatures as a bounded element of the policy, from real Nix 2.26 builds.

One store builds the chains with ``secret-key-files`` set (the cache key "cache-1"), so
Nix signs every narinfo and realisation as it registers them, and ``nix copy``s every
output and realisation to a file cache. builderA signs traces of every step; each scenario
publishes only some of them (the "traced" steps), picks a policy, may change the cache the
way an attacker would, and states the outcome and exactly which paths were accepted on a
cache signature alone. Negative cases are named after the attack.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixharness import NixEnv, get_tier
from tracehook.nix.storepath import hash_part
from tracehook.signer import examine
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.tracestore import FileTraceStore
from tracehook.trace import crypto
from verifyhelp import BUILDER, public_text, run_verify, secret, write_policy

pytestmark = pytest.mark.nix

ATTRS = ("caC", "iaC", "iaOnCa")
CACHE_KEY = secret("cache-1")
CACHE_PUB = crypto.format_public_key(CACHE_KEY.public)
MIXED = f'{{ any-of = ["builderA", {{ narinfo-key = "{CACHE_PUB}" }}] }}'
TRACES_ONLY = '"builderA"'
CACHE_ONLY = f'{{ narinfo-key = "{CACHE_PUB}" }}'
REVOKED = f'{{ any-of = ["builderA", {{ narinfo-key = "{CACHE_PUB}", revoked = true }}] }}'


@dataclass(frozen=True)
class Built:
    env: NixEnv
    drvs: dict[str, str]  # attr -> .drv path
    outs: dict[str, str]  # step name -> output path ("out")
    cache: Path
    tokens: dict[str, tuple[str, str]]  # step name -> (trace key, builderA's token)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("cache-sigs")
    sec = base / "cache-1.secret"
    sec.write_text(crypto.format_secret_key(CACHE_KEY))
    env = NixEnv(get_tier("2.26"), base / "nix")
    env.configure(secret_key_files=str(sec))
    drvs = {a: env.instantiate(a, salt="cache-sigs") for a in ATTRS}
    for a in ATTRS:
        env.build(a, salt="cache-sigs")
    reader = StoreReader(str(env.root))
    local = examine.LocalStore(str(env.root))
    outs: dict[str, str] = {}
    tokens: dict[str, tuple[str, str]] = {}
    all_drvs: list[str] = []
    for top in drvs.values():
        for path, drv in reader.load_closure(top).items():
            if drv.kind == "fixed" or drv.name in tokens:
                continue
            step = examine.examine(local, path)
            assert isinstance(step, examine.BuildStep), step
            outs[drv.name] = step.outputs["out"].path
            tokens[drv.name] = (step.resolution.key.key,
                                examine.sign(step, secret("builderA"), BUILDER))
            all_drvs.append(path)
    local.close()
    cache = base / "cache"
    env.run("nix", "copy", "--to", f"file://{cache}", *outs.values(),
            *(f"{d}^*" for d in all_drvs))
    return Built(env, drvs, outs, cache, tokens)


Edit = Callable[[Built, Path], None]


def tamper_narinfo(name: str) -> Edit:
    """The cache serves another NarHash for the step's output, keeping the signature."""
    def edit(b: Built, cache: Path) -> None:
        file = cache / f"{hash_part(b.outs[name])}.narinfo"
        text = file.read_text()
        m = re.search(r"NarHash: sha256:(\S)", text)
        assert m is not None
        swap = "0" if m.group(1) != "0" else "1"
        file.write_text(text[:m.start(1)] + swap + text[m.end(1):])
    return edit


def redirect_realisation(name: str, to: str) -> Edit:
    """The cache's realisation of ``name`` points at another path; signature kept."""
    def edit(b: Built, cache: Path) -> None:
        for file in (cache / "realisations").iterdir():
            obj = json.loads(file.read_text())
            if obj["outPath"].endswith(f"-{name}"):
                obj["outPath"] = b.outs[to].rsplit("/", 1)[1]
                file.write_text(json.dumps(obj, separators=(",", ":"), sort_keys=True))
    return edit


def unsign_narinfo(name: str) -> Edit:
    def edit(b: Built, cache: Path) -> None:
        file = cache / f"{hash_part(b.outs[name])}.narinfo"
        file.write_text("".join(line + "\n" for line in file.read_text().splitlines()
                                if not line.startswith("Sig:")))
    return edit


def unsign_realisation(name: str) -> Edit:
    def edit(b: Built, cache: Path) -> None:
        for file in (cache / "realisations").iterdir():
            obj = json.loads(file.read_text())
            if obj["outPath"].endswith(f"-{name}"):
                obj["signatures"] = []
                file.write_text(json.dumps(obj, separators=(",", ":"), sort_keys=True))
    return edit


def both(*edits: Edit) -> Edit:
    def edit(b: Built, cache: Path) -> None:
        for e in edits:
            e(b, cache)
    return edit


ALL = ("ca-a", "ca-b", "ca-c", "ia-a", "ia-b", "ia-c", "ia-on-ca")

# name, target, require, traced steps, edit, rc, text, cache-signed steps the target
# relies on (for a refusal: those on the way down to the failing step), covered steps
SCENARIOS: list[tuple[str, str, str, tuple[str, ...], Edit | None, int, str,
                      tuple[str, ...], int]] = [
    ("ia-upper-traced-lower-cache-signed", "iaC", MIXED, ("ia-c",), None, 0,
     "accepted on a cache signature alone", ("ia-a", "ia-b"), 0),
    ("ca-upper-traced-lower-cache-signed", "caC", MIXED, ("ca-c",), None, 0,
     "accepted on a cache signature alone", ("ca-a", "ca-b"), 0),
    ("deferred-on-cache-signed-ca", "iaOnCa", MIXED, ("ia-on-ca",), None, 0,
     "accepted on a cache signature alone", ("ca-b",), 1),
    ("ia-half-traced-refused-traces-only", "iaC", TRACES_ONLY, ("ia-c",), None, 1,
     "ia-a: no trace for resolved step", (), 0),
    ("ca-half-traced-refused-traces-only", "caC", TRACES_ONLY, ("ca-c",), None, 1,
     "ca-a: no trace for resolved step", (), 0),
    ("fully-traced-prefers-traces", "caC", MIXED, ALL, None, 0,
     "signed by builderA", (), 0),
    ("untraced-target-covers-its-chain", "caC", MIXED, (), None, 0,
     "2 build step(s) below", ("ca-c",), 2),
    ("lower-traced-upper-cache-signed", "iaC", MIXED, ("ia-a", "ia-b"), None, 0,
     "accepted on a cache signature alone", ("ia-c",), 0),
    ("cache-key-only-policy", "iaC", CACHE_ONLY, ALL, None, 0,
     "2 build step(s) below", ("ia-c",), 2),
    # a cache signature on the target takes responsibility for what is wrong below it
    ("tampered-lower-narinfo-but-target-cache-signed", "iaC", MIXED, ("ia-c",),
     tamper_narinfo("ia-b"), 0, "2 build step(s) below", ("ia-c",), 2),
    ("tampered-narinfo-nar-hash", "iaC", MIXED, ("ia-c",),
     both(tamper_narinfo("ia-b"), unsign_narinfo("ia-c")), 1,
     "bad signature by 'cache-1'", ("ia-a",), 0),
    ("redirected-ca-realisation", "caC", MIXED, ("ca-c",),
     both(redirect_realisation("ca-b", "ca-a"), unsign_realisation("ca-c")), 1,
     "bad signature by 'cache-1'", ("ca-a",), 0),
    ("unsigned-narinfo", "iaC", MIXED, ("ia-c",),
     both(unsign_narinfo("ia-a"), unsign_narinfo("ia-c")), 1, "is not signed", ("ia-b",),
     0),
    ("revoked-cache-key", "iaC", REVOKED, ("ia-c",), None, 1,
     "cache key 'cache-1' is revoked", (), 0),
]


@pytest.mark.parametrize(
    ("name", "attr", "require", "traced", "edit", "rc", "text", "cached", "covered"),
    SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario(
    name: str, attr: str, require: str, traced: tuple[str, ...], edit: Edit | None, rc: int,
    text: str, cached: tuple[str, ...], covered: int, built: Built, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    traces = tmp_path / "traces"
    store = FileTraceStore(f"file://{traces}", traces)
    (traces / "traces").mkdir(parents=True)
    for step in traced:
        key, token = built.tokens[step]
        store.append(key, [token])
    cache = built.cache
    if edit is not None:
        cache = tmp_path / "cache"
        shutil.copytree(built.cache, cache)
        edit(built, cache)
    policy = write_policy(tmp_path / "policy.toml", require, ("builderA",))
    args = [built.drvs[attr], "--policy", str(policy), "--store", str(built.env.root),
            "--traces", f"file://{traces}", "--narinfo-from", f"file://{cache}"]
    res = run_verify(capsys, *args, "--explain-trust")
    assert res.rc == rc, res.out + res.err
    assert text in res.out, res.out
    report = run_verify(capsys, *args, "--json").json()
    assert report["verified"] is (rc == 0)
    assert sorted(report["cache_signed_paths"]) == sorted(built.outs[s] for s in cached)
    summary = report["trust_summary"]
    assert summary["covered_without_traces"] == covered
    got = {s["name"] for s in summary["accepted_on_cache_signature"]}
    assert got == set(cached)
    for step in summary["accepted_on_cache_signature"]:
        assert step["keys"] == ["cache-1"]
    for path in cached if rc == 0 else ():
        assert built.outs[path] in res.out
    if rc == 0 and not cached:
        assert "accepted on a cache signature alone" not in res.out


def test_explain_trust_summarises_the_closure(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    traces = tmp_path / "traces"
    store = FileTraceStore(f"file://{traces}", traces)
    key, token = built.tokens["ia-c"]
    store.append(key, [token])
    policy = write_policy(tmp_path / "policy.toml", MIXED, ("builderA",))
    res = run_verify(capsys, built.drvs["iaC"], "--policy", str(policy), "--store",
                     str(built.env.root), "--traces", f"file://{traces}", "--narinfo-from",
                     f"file://{built.cache}", "--explain-trust")
    assert res.rc == 0, res.out
    assert "1 step(s) verified by traces (builderA: 1)" in res.out, res.out
    assert "2 step(s) accepted on a cache signature (cache-1: 2)" in res.out, res.out
    assert "0 step(s) refused" in res.out, res.out


def test_cache_policy_needs_a_cache(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path / "policy.toml", MIXED, ("builderA",))
    res = run_verify(capsys, built.drvs["iaC"], "--policy", str(policy), "--store",
                     str(built.env.root), "--traces", f"file://{tmp_path}")
    assert res.rc == 2
    assert "--narinfo-from" in res.err


def test_public_text_is_not_the_cache_key() -> None:
    """The cache key is a fixed test key distinct from the builders' keys."""
    assert public_text("builderA") != CACHE_PUB
