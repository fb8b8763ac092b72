"""The attack table of issue 13: one row per attack an adversarial review made, named after
it (the pytest ids), each asserting the refusal or the error.

Rows that involve what Nix fetches run real Nix 2.26: a builder store builds and signs once
(module fixture ``site``; its narinfos also signed by a cache key, ``cache-1``), every row
copies the cache and the trace store, plays the attacker on the copy, then a fresh consumer
store that can only substitute through the gate (``--max-jobs 0``) asks for the path. The
others run in process against hand-made stores (tests/gatekit.py ``make_synthetic``).

The items of the issue and their rows:

==  ======================================================  ====================================
 1  references re-signed; the narinfo served not the one    test_cache_drops_a_reference,
    checked                                                 test_cache_adds_a_reference_to_an_
                                                            unverified_path, test_unsigned_
                                                            mirror_first_serves_cut_references,
                                                            test_laut_claim_without_references
 2  an absolute ``URL:`` passed through                     test_absolute_nar_url*
 3  ``file://`` stores unbounded, following symlinks        test_file_trace_store_reads_only_*,
                                                            test_store_reader_reads_only_*
 4  one bad item stops the publisher                        test_publisher_one_poisoned_file_*
 5  one malformed entry hides the valid ones                test_one_malformed_entry_beside_*
 6  a resolution answered with another's value              test_realisation_of_one_resolution_*
 7  md5 and sha1 fixed outputs as anchors                   test_weak_fixed_output_hash_*
 8  a wedged agent adds 120 s to every build                test_signing_agent[wedged]
 9  the hook does not authenticate the agent                test_signing_agent[run-by-another-
                                                            uid] (and NIX_CONFIG in both)
10  log injection through a ``kid``                         test_kid_with_a_line_break_*
11  the socket path deleted; a policy nested 3,000 deep     test_publisher_never_removes_*,
                                                            test_policy_nested_too_deep
12  tamper evidence hidden behind another alternative       test_tampered_mine_trace_beside_*,
                                                            test_forged_narinfo_below_*
==  ======================================================  ====================================

Each row says, in its docstring, what the code before the fix did, so why the row failed
then. Rows marked "held" are attacks that already failed in that review and must keep
failing; the other held attacks are covered elsewhere: HTTP front (tests/test_gate_http.py),
lying upstreams (tests/test_gate_decide.py, tests/test_gate_e2e.py), JWS malformations
(tests/test_jws.py, tests/test_crypto.py), .drv and policy malformations
(tests/test_aterm.py, tests/test_verify_cli.py, tests/test_policy.py), publishing under
outages (tests/test_publish.py), socket and key-file modes (tests/test_agent.py,
tests/test_crypto.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from attackkit import (
    EXE,
    edit_narinfo,
    get,
    listener_of_uid,
    read_narinfo,
    run_measured,
    sign_laut_style,
    wedged_agent,
    without,
)
from cacheserver import serve_cache, sparse_file
from gatekit import (
    Signed,
    Synthetic,
    built_steps,
    copy_to_cache,
    key,
    make_synthetic,
    running_gate,
    sign_closure,
    tamper_trace,
    write_gate_key,
    write_policy,
)
from nixharness import REPO, NixEnv, NixTier
from spoolhelp import make_entry
from tracehook import cli
from tracehook.nix import realisation
from tracehook.nix.derivation import Derivation, DerivationOutput, encode_drv, serialize
from tracehook.nix.derivation_hash import realisation_ids
from tracehook.nix.storepath import (
    basename,
    derivation_path,
    hash_part,
    make_fixed_output_path,
)
from tracehook.stores.eventlog import parse_record
from tracehook.stores.http import USER_AGENT
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.spool import Spool
from tracehook.trace import crypto, jws
from tracehook.trace.stepkey import step_key
from traceserver import serve_traces
from verifyhelp import run_verify

SALT = "attacks"
BUILT = ("refLib", "refApp", "refEvil", "caRefLib", "caRefApp", "fodMd5", "fodSha1",
         "caOnMd5", "caOnSha1")
SIGNED = ("refApp", "caRefApp", "caOnMd5", "caOnSha1")  # ref-evil is never signed
CACHE_PUB = crypto.format_public_key(key("cache-1").public)
CACHE_KEY_ONLY = f'{{ narinfo-key = "{CACHE_PUB}" }}'
MINE_OR_CACHE = f'{{ any-of = ["builderA", {{ narinfo-key = "{CACHE_PUB}" }}] }}'


# ============================================================ real Nix: the builder site


@dataclass(frozen=True)
class Site:
    builder: NixEnv
    cache: Path  # nix copy of every output (narinfos signed by cache-1) and realisation
    traces: Path  # builderA's traces, references attested
    laut_traces: Path  # builderA's traces in laut's shape: no references
    drvs: dict[str, str]
    outs: dict[str, str]
    signed: Signed


@pytest.fixture(scope="module")
def site(nix226: NixTier, tmp_path_factory: pytest.TempPathFactory) -> Site:
    base = tmp_path_factory.mktemp("attacks")
    cache_key = base / "cache-1.secret"
    cache_key.write_text(crypto.format_secret_key(key("cache-1")))
    env = NixEnv(nix226, base / "builder")
    env.configure(secret_key_files=str(cache_key))
    drvs = {a: env.instantiate(a, salt=SALT) for a in BUILT}
    outs = {a: env.build(a, salt=SALT).out_paths[0] for a in BUILT}
    signed = sign_closure(env, [drvs[a] for a in SIGNED], key("builderA"), base / "traces")
    sign_laut_style(env, [drvs["caRefApp"]], key("builderA"), base / "laut-traces")
    copy_to_cache(env, base / "cache", list(drvs.values()), list(outs.values()))
    return Site(env, base / "cache", base / "traces", base / "laut-traces", drvs, outs, signed)


@dataclass
class Scene:
    """One row's copy of the site, for the attacker to change."""

    site: Site
    tmp: Path
    cache: Path
    traces: Path

    def policy(self, require: str = '"builderA"', weak: bool = False) -> Path:
        path = write_policy(self.tmp / "policy.toml", self.traces, require, ["builderA"])
        if weak:
            path.write_text('weak-fixed-output-hashes = "allow"\n' + path.read_text())
        return path

    def out(self, attr: str) -> str:
        return self.site.outs[attr]


def scene(site: Site, tmp: Path, laut: bool = False) -> Scene:
    cache, traces = tmp / "cache", tmp / "traces"
    shutil.copytree(site.cache, cache)
    shutil.copytree(site.laut_traces if laut else site.traces, traces)
    return Scene(site, tmp, cache, traces)


@dataclass
class Outcome:
    got: dict[str, bool]  # attr -> its output is in the consumer's store
    stderr: dict[str, str]
    events: list[dict[str, object]]
    consumer: NixEnv
    log_file: Path

    def has(self, path: str) -> bool:
        """``path`` is a valid path of the consumer's store (registered, not just on disk)."""
        return self.consumer.run("nix-store", "--check-validity", path,
                                 check=False).returncode == 0

    def reasons(self, outcome: str = "refused") -> str:
        return "\n".join(str(e.get("reason")) for e in self.events if e["outcome"] == outcome)


def consume(tier: NixTier, sc: Scene, attrs: tuple[str, ...], policy: Path,
            upstreams: list[str] | None = None, fail_on_tamper: bool = False,
            direct_nars: bool = True) -> Outcome:
    """A fresh consumer that substitutes only through the gate (``--max-jobs 0``)."""
    consumer = NixEnv(tier, sc.tmp / "consumer")
    for attr in attrs:
        consumer.instantiate(attr, salt=SALT)
    gate_key, gate_pub = write_gate_key(sc.tmp)
    log_file = sc.tmp / "gate.log"
    with running_gate(policy, upstreams or [f"file://{sc.cache}"], str(consumer.root),
                      log_file, signing_key=gate_key, fail_on_tamper=fail_on_tamper,
                      direct_nars=direct_nars) as running:
        consumer.configure(substituters=running.url, trusted_public_keys=gate_pub)
        got, errs = {}, {}
        for attr in attrs:
            res = consumer.build(attr, "--max-jobs", "0", salt=SALT, check=False)
            got[attr] = bool(res.out_paths) and all(consumer.real(p).exists()
                                                    for p in res.out_paths)
            errs[attr] = res.stderr
        events = running.events()
    return Outcome(got, errs, events, consumer, log_file)


# ====================================================== 1. references, and 2. NAR URLs


def test_cache_drops_a_reference(nix226: NixTier, site: Site, tmp_path: Path) -> None:
    """Item 1, real Nix: the cache's narinfo of ref-app no longer lists ref-lib, which
    ref-app's content names. Before the fix the gate re-signed ``References:`` as the cache
    gave it: Nix substituted ref-app with references [] and never fetched ref-lib. Now the
    gate serves only the attested references, so Nix gets nothing."""
    sc = scene(site, tmp_path)
    lib, app = sc.out("refLib"), sc.out("refApp")
    assert read_narinfo(sc.cache, app).references == (basename(lib),)
    edit_narinfo(sc.cache, app, references=())
    out = consume(nix226, sc, ("refApp",), sc.policy())
    assert out.got == {"refApp": False}, out.stderr
    assert not out.has(app)
    assert f"drops {lib}" in out.reasons(), out.events
    assert not [e for e in out.events if e["outcome"] == "allowed" and e.get("path") == app]


def test_cache_adds_a_reference_to_an_unverified_path(nix226: NixTier, site: Site,
                                                     tmp_path: Path) -> None:
    """Item 1, real Nix: the narinfo of ref-app also lists ref-evil, a path in the cache that
    no trace vouches for. Before the fix the gate signed that narinfo (it named an unverified
    path); now it refuses it, naming the added reference, and ref-evil never reaches the
    consumer."""
    sc = scene(site, tmp_path)
    app, evil = sc.out("refApp"), sc.out("refEvil")
    ni = read_narinfo(sc.cache, app)
    edit_narinfo(sc.cache, app, references=(*ni.references, basename(evil)))
    out = consume(nix226, sc, ("refApp",), sc.policy())
    assert out.got == {"refApp": False}, out.stderr
    assert not out.has(app) and not out.has(evil)
    assert f"adds {evil}" in out.reasons(), out.events


@pytest.mark.parametrize("require", ["cache-key", "traces"])
def test_unsigned_mirror_first_serves_cut_references(
    nix226: NixTier, site: Site, tmp_path: Path, require: str
) -> None:
    """Item 1, real Nix: two upstreams, an unsigned mirror listed first whose narinfo of
    ref-app lists no references, then the real cache. Before the fix the gate checked the
    cache signature on the second upstream's narinfo but served the mirror's, cut down and
    re-signed: Nix got ref-app without ref-lib. Now it serves exactly the narinfo it checked:
    Nix gets the whole closure, and the gate's narinfo lists ref-lib."""
    sc = scene(site, tmp_path)
    lib, app = sc.out("refLib"), sc.out("refApp")
    mirror = tmp_path / "mirror"
    shutil.copytree(sc.cache, mirror)
    for f in mirror.glob("*.narinfo"):  # unsigned
        f.write_text("".join(line for line in f.read_text().splitlines(keepends=True)
                             if not line.startswith("Sig:")))
    edit_narinfo(mirror, app, references=())
    policy = sc.policy(CACHE_KEY_ONLY if require == "cache-key" else '"builderA"')
    out = consume(nix226, sc, ("refApp",), policy, [f"file://{mirror}", f"file://{sc.cache}"])
    assert out.got == {"refApp": True}, out.stderr
    assert out.has(lib), "the closure is complete"
    allowed = [e for e in out.events if e["outcome"] == "allowed" and e.get("path") == app]
    assert allowed and {e["upstream"] for e in allowed} == {f"file://{sc.cache}"}
    refs = out.consumer.run("nix-store", "--query", "--references", app).stdout.split()
    assert refs == [lib]


@pytest.mark.parametrize("url", ["another-host", "file:///etc/shadow"])
def test_absolute_nar_url(nix226: NixTier, site: Site, tmp_path: Path, url: str) -> None:
    """Item 2, real Nix: the narinfo's ``URL:`` points away from the gate: at another host
    (a server that holds the very NAR and records every request) or at ``/etc/shadow``.
    Before the fix the gate passed the URL through and signed it, and Nix fetched the NAR
    from the other host, around the gate. Now the gate refuses it, and the other host sees
    no request at all."""
    sc = scene(site, tmp_path)
    app = sc.out("refApp")
    with serve_cache(sc.cache) as other:
        absolute = (f"{other.url}/{read_narinfo(sc.cache, app).url}" if url == "another-host"
                    else url)
        edit_narinfo(sc.cache, app, url=absolute, sigs=read_narinfo(sc.cache, app).sigs)
        out = consume(nix226, sc, ("refApp",), sc.policy())
        assert other.state.requests == []
    assert out.got == {"refApp": False}, out.stderr
    assert f"{absolute!r} points away from the gate" in out.reasons(), out.events


def test_absolute_nar_url_on_the_upstream_itself_is_made_relative(
    nix226: NixTier, site: Site, tmp_path: Path
) -> None:
    """Item 2, real Nix: an HTTP upstream whose narinfos name their own NARs by absolute
    URLs are served with those URLs made relative: Nix fetches each NAR from the gate, and
    the upstream sees only the gate's requests. Before the fix the URL was passed through
    and Nix fetched the NARs from the upstream itself."""
    sc = scene(site, tmp_path)
    lib, app = sc.out("refLib"), sc.out("refApp")
    with serve_cache(sc.cache) as upstream:
        for path in (lib, app):
            rel = read_narinfo(sc.cache, path).url
            edit_narinfo(sc.cache, path, url=f"{upstream.url}/{rel}",
                         sigs=read_narinfo(sc.cache, path).sigs)
        out = consume(nix226, sc, ("refApp",), sc.policy(), [upstream.url])
        nars = [agent for r, agent in zip(upstream.state.requests, upstream.state.agents,
                                          strict=True) if r.startswith("/nar/")]
    assert out.got == {"refApp": True}, out.stderr
    assert nars == [USER_AGENT] * 2, nars  # the gate's reads only: Nix asked the gate


# ================================================ 1. claims without references (laut)


@pytest.mark.parametrize("attack", ["honest", "drops-a-direct-input", "adds-a-reference"])
def test_laut_claim_without_references(nix226: NixTier, site: Site, tmp_path: Path,
                                       attack: str) -> None:
    """Item 1, real Nix: builderA's traces in laut's shape attest no references, so the gate
    scans the NAR of ca-ref-app (whose content names ca-ref-lib, its direct input) and
    refuses a narinfo that drops that input or lists a path its content does not name.
    Before the fix the gate re-signed whatever References the cache gave (and, until this
    table, the scan looked only for the step's own outputs, so a dropped input passed: Nix
    2.26 then warned that the path "claims to be content-addressed but isn't" and aborted
    on an assertion in copyStorePath)."""
    sc = scene(site, tmp_path, laut=True)
    lib, app, evil = sc.out("caRefLib"), sc.out("caRefApp"), sc.out("refEvil")
    refs = read_narinfo(sc.cache, app).references
    assert refs == (basename(lib),)
    if attack == "drops-a-direct-input":
        edit_narinfo(sc.cache, app, references=without(refs, lib))
    elif attack == "adds-a-reference":
        edit_narinfo(sc.cache, app, references=(*refs, basename(evil)))
    out = consume(nix226, sc, ("caRefApp",), sc.policy())
    if attack == "honest":
        assert out.got == {"caRefApp": True}, out.stderr
        assert out.has(lib)
        return
    assert out.got == {"caRefApp": False}, out.stderr
    assert not out.has(app)
    said = (f"drops {lib}, which its content names" if attack == "drops-a-direct-input"
            else f"adds {evil}, which its content does not name")
    assert said in out.reasons(), out.events


@pytest.mark.parametrize("nar_urls", ["direct", "gate"])
def test_held_tampered_nar_is_stopped_by_nix(nix226: NixTier, site: Site, tmp_path: Path,
                                            nar_urls: str) -> None:
    """Held: the cache serves another NAR under ref-lib's narinfo (its NarHash unchanged).
    Whether Nix reads the NAR file itself (``--nar-urls direct``: the narinfo names it by a
    file:// URL) or the gate streams it as it is (``gate``), Nix checks it against the
    NarHash the gate signed and refuses it, so nothing unverified enters the store."""
    sc = scene(site, tmp_path)
    lib, evil = sc.out("refLib"), sc.out("refEvil")
    shutil.copyfile(sc.cache / str(read_narinfo(sc.cache, evil).url),
                    sc.cache / str(read_narinfo(sc.cache, lib).url))
    out = consume(nix226, sc, ("refLib",), sc.policy(), direct_nars=nar_urls == "direct")
    assert out.got == {"refLib": False}
    assert not out.has(lib)
    assert "hash mismatch" in out.stderr["refLib"], out.stderr


@pytest.mark.parametrize("nar_urls", ["direct", "gate"])
def test_missing_nar_is_said_by_nix_or_logged(nix226: NixTier, site: Site, tmp_path: Path,
                                              nar_urls: str) -> None:
    """The cache lost ref-lib's NAR (its narinfo is still there): Nix cannot substitute it.
    With ``--nar-urls direct`` Nix reads the file itself and says it does not exist; with
    ``gate`` the gate logs ``unavailable nar``."""
    sc = scene(site, tmp_path)
    lib = sc.out("refLib")
    (sc.cache / str(read_narinfo(sc.cache, lib).url)).unlink()
    out = consume(nix226, sc, ("refLib",), sc.policy(), direct_nars=nar_urls == "direct")
    assert out.got == {"refLib": False}
    assert not out.has(lib)
    unavailable = [e for e in out.events if e["outcome"] == "unavailable"]
    if nar_urls == "direct":
        assert "does not exist in binary cache" in out.stderr["refLib"], out.stderr
        assert not unavailable, unavailable
    else:
        assert unavailable and unavailable[0]["request"] == "nar", out.events


# ======================================================= 12. tamper evidence is reported


def test_tampered_mine_trace_beside_a_cache_signature(
    nix226: NixTier, site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 12, real Nix: under ``any-of = ["mine", { narinfo-key = ... }]`` builderA's
    trace of ref-app is tampered with, and the cache signed ref-app too. The path is
    admitted (on the cache signature), and the tampering is reported everywhere: a
    ``tampered`` gate event, ``tracehook log --refused``, verify's human report and JSON;
    ``--fail-on-tamper`` (verify and gate) refuses. Before the fix it was silently
    overridden: the gate logged a plain "allowed", verify said "0 step(s) refused"."""
    sc = scene(site, tmp_path)
    tamper_trace(sc.traces, site.signed.key_of("ref-app"))
    policy = sc.policy(MINE_OR_CACHE)
    out = consume(nix226, sc, ("refApp",), policy)
    assert out.got == {"refApp": True}, out.stderr
    tampered = [e for e in out.events if e["outcome"] == "tampered"]
    assert tampered and all("ref-app" in str(e["name"]) for e in tampered), out.events
    assert "bad signature" in str(tampered[0]["reason"])
    shown = subprocess.run([EXE, "log", "--refused", str(out.log_file)], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    assert any("tampered" in line and "ref-app" in line for line in shown.splitlines()), shown
    args = [site.drvs["refApp"], "--policy", str(policy), "--store", str(site.builder.root),
            "--narinfo-from", f"file://{sc.cache}"]
    human = run_verify(capsys, *args)
    assert human.rc == 0, human.out + human.err
    assert "TAMPER EVIDENCE at ref-app" in human.out and "bad signature" in human.out
    report = run_verify(capsys, *args, "--json").json()
    assert report["verified"] is True
    assert [t["step"] for t in report["tampered"]] == ["ref-app"]
    strict = run_verify(capsys, *args, "--fail-on-tamper")
    assert strict.rc == 1 and "--fail-on-tamper" in strict.out
    sc.tmp = tmp_path / "strict"
    sc.tmp.mkdir()
    out = consume(nix226, sc, ("refApp",), policy, fail_on_tamper=True)
    assert out.got == {"refApp": False}
    assert "tamper evidence at ref-app (--fail-on-tamper)" in out.reasons(), out.events


def test_forged_narinfo_below_a_cache_signed_step(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 12: no traces at all, ref-app accepted on the cache's signature, and below it
    ref-lib's narinfo carries a forged ``Sig:`` by the cache key. Verify admits ref-app on
    the cache signature and reports the forgery at ref-lib as tamper evidence (human and
    JSON); ``--fail-on-tamper`` refuses. Before the fix ref-lib showed only as
    ``covered``."""
    sc = scene(site, tmp_path)
    for step in ("ref-app", "ref-lib"):
        (sc.traces / "traces" / site.signed.key_of(step)).unlink()
    lib = sc.out("refLib")
    (sig,) = read_narinfo(sc.cache, lib).sigs
    name, b64 = sig.split(":", 1)
    forged = f"{name}:{b64[:10]}{'A' if b64[10] != 'A' else 'B'}{b64[11:]}"
    edit_narinfo(sc.cache, lib, sigs=(forged,))
    args = [site.drvs["refApp"], "--policy", str(sc.policy(MINE_OR_CACHE)), "--store",
            str(site.builder.root), "--narinfo-from", f"file://{sc.cache}"]
    report = run_verify(capsys, *args, "--json").json()
    assert report["verified"] is True and report["trust"] == "cache"
    assert [t["step"] for t in report["tampered"]] == ["ref-lib"], report["tampered"]
    assert "bad signature" in report["tampered"][0]["seen"]
    human = run_verify(capsys, *args)
    assert human.rc == 0 and "TAMPER EVIDENCE at ref-lib" in human.out, human.out
    assert run_verify(capsys, *args, "--fail-on-tamper").rc == 1


# ========================================================= 7. weak fixed-output hashes


@pytest.mark.parametrize("algo", ["md5", "sha1"])
def test_weak_fixed_output_hash_is_no_anchor(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str], algo: str
) -> None:
    """Item 7: a fixed-output derivation pinned by md5 or sha1 (built by real Nix) is no
    trust anchor: verify refuses the step built on it and the gate refuses the fixed
    output's narinfo and the realisation above it, each naming the hash; the policy switch
    ``weak-fixed-output-hashes = "allow"`` lets both through. Before the fix both counted
    as anchors."""
    attr, fod = ("caOnMd5", "fodMd5") if algo == "md5" else ("caOnSha1", "fodSha1")
    sc = Scene(site, tmp_path, site.cache, site.traces)
    (rid,) = site.builder.recorded_realisations([site.drvs[attr]])
    for weak in (False, True):
        policy = sc.policy(weak=weak)
        res = run_verify(capsys, site.drvs[attr], "--policy", str(policy), "--store",
                         str(site.builder.root))
        with running_gate(policy, [f"file://{site.cache}"], str(site.builder.root),
                          tmp_path / f"gate-{weak}.log") as gate:
            fixed = get(f"{gate.url}/{hash_part(site.outs[fod])}.narinfo")
            above = get(f"{gate.url}/realisations/{rid}.doi")
            reasons = " ".join(str(e["reason"]) for e in gate.refusals())
        if weak:
            assert (res.rc, fixed.status, above.status) == (0, 200, 200), res.out + reasons
            assert json.loads(above.body)["outPath"] == basename(site.outs[attr])
            continue
        assert res.rc == 1 and f"pinned by {algo}, a weak hash" in res.out, res.out
        assert (fixed.status, above.status) == (404, 404)
        assert reasons.count(f"pinned by {algo}, a weak hash") == 2, reasons


# ======================================================== 6. resolution-exact answers


@dataclass(frozen=True)
class Diverged:
    root: Path  # the gate's store: ca-on-random's .drv and both builders' resolved copies
    cache: Path
    traces: Path  # builderA's and builderB's traces
    drv: str  # ca-on-random
    rdrvs: dict[str, str]  # signer -> the resolved derivation it built
    outs: dict[str, str]  # signer -> its output of ca-on-random


@pytest.fixture(scope="module")
def diverged(nix226: NixTier, tmp_path_factory: pytest.TempPathFactory) -> Diverged:
    """Two builders build ca-random (not reproducible) and ca-on-random on it: A resolves
    ca-on-random to R1 and gets Y1, B resolves it to R2 and gets Y2."""
    base = tmp_path_factory.mktemp("diverged")
    consumer = NixEnv(nix226, base / "consumer")
    drv = consumer.instantiate("caOnRandom", salt=SALT)
    rdrvs, outs = {}, {}
    for signer in ("builderA", "builderB"):
        env = NixEnv(nix226, base / signer)
        assert env.instantiate("caOnRandom", salt=SALT) == drv
        outs[signer] = env.build("caOnRandom", salt=SALT).out_paths[0]
        sign_closure(env, [drv], key(signer), base / "traces")
        (step,) = [s for s in built_steps(env, [drv]) if s.drv_path == drv]
        rdrvs[signer] = step.resolution.rdrv_path
        shutil.copyfile(env.real(rdrvs[signer]), consumer.real(rdrvs[signer]))
        copy_to_cache(env, base / "cache", [], [outs[signer]])  # outputs, no realisations
    assert len(set(rdrvs.values())) == len(set(outs.values())) == 2, "the builders diverged"
    return Diverged(consumer.root, base / "cache", base / "traces", drv, rdrvs, outs)


def test_realisation_of_one_resolution_answered_with_anothers_value(
    diverged: Diverged, tmp_path: Path
) -> None:
    """Item 6, real Nix builds, the gate over HTTP: builders diverged on an input (A attests
    R1 -> Y1, B attests R2 -> Y2) under ``any-of``. Once the gate has verified ca-on-random
    (Nix asks for the unresolved id first), a realisation asked for by R1's id is answered
    with Y1 only, and R2's with Y2. Before the fix the gate answered from every verified
    value of the step, so one of the two resolutions got the other's output, signed."""
    policy = write_policy(tmp_path / "policy.toml", diverged.traces,
                          '{ any-of = ["builderA", "builderB"] }', ["builderA", "builderB"])
    reader = StoreReader(str(diverged.root))
    unresolved = realisation_ids(reader.read_derivation(diverged.drv),
                                 reader.read_derivation)["out"]
    gate_key, gate_pub = write_gate_key(tmp_path)
    with running_gate(policy, [f"file://{diverged.cache}"], str(diverged.root),
                      tmp_path / "gate.log", signing_key=gate_key) as gate:
        first = get(f"{gate.url}/realisations/{unresolved}.doi")
        assert first.status == 200, gate.refusals()
        assert json.loads(first.body)["outPath"] in {basename(p) for p in diverged.outs.values()}
        for signer, rdrv in diverged.rdrvs.items():
            rid = realisation_ids(reader.read_derivation(rdrv))["out"]
            reply = get(f"{gate.url}/realisations/{rid}.doi")
            assert reply.status == 200, gate.refusals()
            answer = realisation.parse_doi_v1(reply.body)
            assert answer.out_path == basename(diverged.outs[signer]), signer
            (sig,) = answer.signatures
            gate_pk = crypto.parse_public_key(gate_pub)
            assert crypto.nix_verify({"gate-1": gate_pk}, realisation.fingerprint_v1(answer),
                                     sig) == gate_pk


# ============================================== 8, 9. the hook and the signing agent


def _hooked(tier: NixTier, tmp: Path, sock: Path) -> NixEnv:
    """A builder whose post-build hook (hooks/post-build) tries the agent at ``sock`` for
    at most 1 s; nix.conf holds a secret (``access-tokens``), which Nix hands the hook in
    ``NIX_CONFIG``; a chained hook records that it was there."""
    env = NixEnv(tier, tmp / "builder")
    secret = tmp / "builder.secret"
    secret.write_text(crypto.format_secret_key(key("builderA")))
    chained = tmp / "chained.sh"
    chained.write_text(f'#!/bin/sh\nprintf %s "$NIX_CONFIG" > {tmp / "nix-config.seen"}\n')
    chained.chmod(0o755)
    conf = tmp / "sign.toml"
    conf.write_text(f'secret-key-file = "{secret}"\nspool-dir = "{tmp / "spool"}"\n'
                    f'log-file = "{tmp / "sign.log"}"\nagent-socket = "{sock}"\n'
                    f'agent-timeout = 1\nchain-hooks = ["{chained}"]\n')
    env.configure(post_build_hook=str(REPO / "hooks" / "post-build"),
                  access_tokens="example.org=SECRET-TOKEN-13")
    env.extra_env["TRACEHOOK_CONFIG"] = str(conf)
    return env


@pytest.mark.parametrize("agent", ["wedged", "run-by-another-uid"])
def test_signing_agent(nix226: NixTier, tmp_path: Path, agent: str) -> None:
    """Items 8 and 9, real Nix: the hook meets a signing agent that never answers, or one run
    by another user (uid 4242) at the configured socket. The build finishes at once (the
    wait is bounded: 1 s here), the hook signs in its own process, the other user's agent
    is sent nothing, and what any agent is sent is DRV_PATH and OUT_PATHS only, never
    NIX_CONFIG (which held the access token). Before the fix a wedged agent added the hook's
    120 s to every build, and a listener of another user got Nix's whole environment and
    its fake reply meant nothing was signed."""
    sock = tmp_path / "agent.sock"
    env = _hooked(nix226, tmp_path, sock)
    drv = env.instantiate("iaA", salt=agent)
    started = time.monotonic()
    if agent == "wedged":
        with wedged_agent(sock) as fake:
            res = env.build("iaA", salt=agent)
            took = time.monotonic() - started
        sent = fake.received
        assert json.loads(sent) == {"DRV_PATH": drv, "OUT_PATHS": res.out_paths[0]}
        assert "did not answer within 1 s" in res.stderr, res.stderr
    else:
        with listener_of_uid(sock, 4242) as other:
            res = env.build("iaA", salt=agent)
            took = time.monotonic() - started
            sent = other.received()
        assert sent == b""
        assert "runs as uid 4242, not 0" in res.stderr, res.stderr
    assert took < 30, took
    assert b"SECRET-TOKEN-13" not in sent
    assert "SECRET-TOKEN-13" in (tmp_path / "nix-config.seen").read_text()  # it was there
    (entry,) = Spool(tmp_path / "spool").pending()
    assert entry.entry.drv_path == drv
    record = json.loads((tmp_path / "sign.log").read_text().splitlines()[-1])
    assert (record["event"], record["outcome"], record["via"]) == ("sign", "ok", "hook")


# ======================================== in process: hand-made stores (no Nix needed)


@pytest.fixture
def syn(tmp_path: Path) -> Synthetic:
    return make_synthetic(tmp_path / "syn")


def _ia_trace(syn: Synthetic) -> Path:
    """The trace file of the synthetic input-addressed step (signed by builderA)."""
    drv = StoreReader(str(syn.root)).read_derivation(syn.ia_drv)
    return syn.traces / "traces" / step_key(drv, {}).key.key


def _verify_argv(syn: Synthetic, *extra: str) -> list[str]:
    return [syn.ia_drv, "--policy", str(syn.policy), "--store", str(syn.root), *extra]


# ------------------------------------------------ 3. file:// trace stores, store reader


@pytest.mark.parametrize("poison", ["300-MB-trace-file", "symlink-to-dev-zero", "fifo"])
def test_file_trace_store_reads_only_bounded_regular_files(syn: Synthetic, tmp_path: Path,
                                                         poison: str) -> None:
    """Item 3: the trace file a step needs is 300 MB, a symlink to /dev/zero, or a FIFO, in
    a ``file://`` trace store. The gate answers 502 at once naming the file (a fault, never
    "no trace", never an allow), and ``tracehook verify`` exits 3 within seconds and a few
    MiB of memory. Before the fix the 300 MB file took the gate to 645 MB, /dev/zero ran to
    a MemoryError and a FIFO hung the verification (here: killed at the 60 s deadline)."""
    trace = _ia_trace(syn)
    trace.unlink()
    if poison == "300-MB-trace-file":
        sparse_file(trace, 300 << 20)
        said = "is larger than 16777216 bytes"
    elif poison == "symlink-to-dev-zero":
        trace.symlink_to("/dev/zero")
        said = "is a symlink; only regular files are read"
    else:
        os.mkfifo(trace)
        said = "is not a regular file"
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        started = time.monotonic()
        reply = get(f"{gate.url}/{hash_part(syn.ia_out)}.narinfo", timeout=30)
        assert reply.status == 502 and time.monotonic() - started < 10
        failed = " ".join(str(e["reason"]) for e in gate.events() if e["outcome"] == "failed")
    assert f"{trace} {said}" in failed, failed
    run = run_measured([EXE, "verify", *_verify_argv(syn)], tmp_path)
    assert run.rc == 3, (run.rc, run.out, run.err)
    assert f"{trace} {said}" in run.out + run.err
    assert run.seconds < 30 and run.peak_mib < 150, (run.seconds, run.peak_mib)


@pytest.mark.parametrize("poison", ["symlink-to-dev-zero", "fifo", "33-MB-drv"])
def test_store_reader_reads_only_bounded_regular_drv_files(syn: Synthetic, tmp_path: Path,
                                                          poison: str) -> None:
    """Item 3: a ``.drv`` in the store directory that a local user made a symlink to
    /dev/zero, a FIFO or a 33 MB file. Verifying it is an error naming the file within
    seconds and a few MiB; the gate, which indexes every .drv, keeps answering for the
    others. Before the fix the store reader followed the link and read without bound."""
    bad = Path(str(syn.root) + f"/nix/store/{'0' * 32}-evil.drv")
    if poison == "symlink-to-dev-zero":
        bad.symlink_to("/dev/zero")
    elif poison == "fifo":
        os.mkfifo(bad)
    else:
        sparse_file(bad, 33 << 20)
    run = run_measured([EXE, "verify", f"/nix/store/{bad.name}", "--policy", str(syn.policy),
                        "--store", str(syn.root)], tmp_path)
    assert run.rc == 3, (run.rc, run.out, run.err)
    assert str(bad) in run.out + run.err
    assert run.seconds < 30 and run.peak_mib < 150, (run.seconds, run.peak_mib)
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        assert get(f"{gate.url}/{hash_part(syn.ia_out)}.narinfo", timeout=30).status == 200


# ------------------------------------------- 4. the publisher never stalls on one item


def test_publisher_one_poisoned_file_among_30_good_keys(tmp_path: Path) -> None:
    """Item 4, ``tracehook publish``: a trace store holds one malformed file (for the key of
    one pending trace) and the spool one entry that can never be published (a key that is
    not a trace key). The 30 other traces are delivered in the first run, the spool entry
    goes to ``bad/``, the malformed file is left as it was and reported for its key alone;
    once a person removed it, the next run delivers the last one. Before the fix nothing
    after the first bad item was delivered (0 of 29 after three rounds)."""
    spool = Spool(tmp_path / "spool")
    entries = [make_entry(i) for i in range(31)]
    for entry in entries:
        spool.add(entry)
    poisoned_entry = dataclasses.replace(make_entry(40), key="../../../etc/passwd")
    (spool.pending_dir / "poisoned.json").write_bytes(poisoned_entry.to_json())
    store = tmp_path / "ts"
    poisoned = store / "traces" / entries[0].key
    poisoned.parent.mkdir(parents=True)
    poisoned.write_bytes(b"\x00\x01 not a trace file")
    config = tmp_path / "sign.toml"
    config.write_text(f'publish-to = ["file://{store}"]\nspool-dir = "{spool.root}"\n'
                      f'log-file = "{tmp_path / "publish.log"}"\n')
    assert cli.main(["publish", "--config", str(config)]) == 3
    for entry in entries[1:]:
        assert jws.parse_trace_file((store / "traces" / entry.key).read_bytes()) == [entry.jws]
    assert poisoned.read_bytes() == b"\x00\x01 not a trace file"
    assert (spool.bad_dir / "poisoned.json").exists()
    records = [json.loads(line) for line in (tmp_path / "publish.log").read_text().splitlines()]
    assert any(r["outcome"] == "bad" and "not 32 nix-base32" in r["reason"] for r in records)
    kept = [r for r in records if r["outcome"] == "kept"]
    assert kept and all(entries[0].key in r["reason"] and "malformed trace file" in r["reason"]
                        for r in kept), kept
    poisoned.unlink()
    assert cli.main(["publish", "--config", str(config)]) == 0
    assert jws.parse_trace_file(poisoned.read_bytes()) == [entries[0].jws]
    assert spool.pending() == []


# ---------------------------------------- 5. one malformed entry hides no valid one


def _bom(token: str) -> bytes:
    return b"\xef\xbb\xbf" + json.dumps({"signatures": [token]}).encode()


def _duplicate_key(token: str) -> bytes:
    return f'{{"signatures": ["not.a.jws"], "signatures": [{json.dumps(token)}]}}'.encode()


def _non_string_entries(token: str) -> bytes:
    return json.dumps({"signatures": [7, None, {"alg": "none"}, ["x"], token]}).encode()


MALFORMED = [
    ("utf8-bom", _bom),
    ("duplicate-signatures-key", _duplicate_key),
    ("non-string-entries", _non_string_entries),
    ("not-json", lambda token: b'{"signatures": ["' + token.encode()),
    ("signatures-not-a-list", lambda token: json.dumps({"signatures": token}).encode()),
]


@pytest.mark.parametrize(("attack", "make"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_one_malformed_entry_beside_a_valid_signature(
    syn: Synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str], attack: str,
    make: object
) -> None:
    """Item 5: a trace file with a UTF-8 BOM, a duplicate ``signatures`` key or entries that
    are not strings beside a valid signature: the valid one counts (verify and the gate
    admit the path). A file that is not a trace file at all is refused as a "malformed
    trace file" naming the file, never "no trace". Before the fix the whole file was
    dropped and the reason said "no trace" (and, until this table, verify's reason still
    said "no trace" for a malformed file)."""
    trace = _ia_trace(syn)
    (token,) = jws.parse_trace_file(trace.read_bytes())
    assert callable(make)
    trace.write_bytes(make(token))
    res = run_verify(capsys, *_verify_argv(syn))
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        reply = get(f"{gate.url}/{hash_part(syn.ia_out)}.narinfo")
        reasons = " ".join(str(e["reason"]) for e in gate.refusals())
    if attack in ("not-json", "signatures-not-a-list"):
        assert (res.rc, reply.status) == (1, 404), res.out
        for said in (res.out.split("why: ", 1)[1].splitlines()[0], reasons):
            assert f"malformed trace file {trace}" in said and "no trace" not in said, said
    else:
        assert (res.rc, reply.status) == (0, 200), res.out + reasons


# ------------------------------------------------------------- 10. log injection


def _with_kid(trace: Path, kid: str) -> None:
    """The trace file's one signature, its header's ``kid`` replaced (unsigned)."""
    (token,) = jws.parse_trace_file(trace.read_bytes())
    header, payload, sig = token.split(".")
    obj = json.loads(jws.b64url_decode(header, "header"))
    obj["kid"] = kid
    forged = jws.b64url_encode(json.dumps(obj).encode())
    trace.write_text(json.dumps({"signatures": [f"{forged}.{payload}.{sig}"]}))


def test_kid_with_a_line_break_and_a_record_forges_nothing(
    syn: Synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 10: an unsigned trace entry whose ``kid`` holds a line break, a fake "allowed"
    sentence, a TAB and a whole fake JSON record (what ``tracehook log`` reads after the
    last TAB of a journal line). The gate's journal and log file, ``tracehook log`` over
    either, and verify's report each show one refusal, with the kid as escaped data on its
    line; no line is forged. Before the fix the kid's newline started a line of its own, so
    the journal and ``tracehook log`` showed a fake "allowed"."""
    record = {"time": "2026-12-02T00:00:00.000Z", "event": "gate", "outcome": "allowed",
              "reason": None, "request": "narinfo", "name": "hello", "path": syn.ia_out}
    kid = f"evil\ntracehook-gate: allowed {syn.ia_out}\t{json.dumps(record)}\n:0123456789abcdef"
    _with_kid(_ia_trace(syn), kid)
    journal = io.StringIO()
    log_file = tmp_path / "gate.log"
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root), log_file,
                      stderr=journal, journal=True) as gate:
        assert get(f"{gate.url}/{hash_part(syn.ia_out)}.narinfo").status == 404
    lines = journal.getvalue().splitlines()
    records = [parse_record(line) for line in lines]
    assert lines and all(line.startswith("tracehook-gate: refused ") for line in lines), lines
    assert all(r is not None and r["outcome"] == "refused" for r in records), records
    assert any("evil\n" in str(r["reason"]) for r in records if r is not None)  # kept as data
    for source, stdin in (("-", journal.getvalue()), (str(log_file), None)):
        shown = subprocess.run([EXE, "log", source], input=stdin, capture_output=True,
                               text=True, timeout=60, check=True)
        assert shown.stderr == "", shown.stderr
        rows = shown.stdout.splitlines()
        assert len(rows) == 1 and rows[0].split()[2:5] == ["gate", "hello", "refused"], rows
        assert "evil\\n" in rows[0]
    report = run_verify(capsys, *_verify_argv(syn))
    assert report.rc == 1
    assert not any(line.startswith("tracehook-gate:") for line in report.out.splitlines())
    assert "\t" not in report.out and "evil\\n" in report.out


# ----------------------------- 11. the publisher's socket path; a policy nested too deep


@pytest.mark.parametrize("thing", ["regular-file", "fifo"])
def test_publisher_never_removes_what_is_not_a_socket(tmp_path: Path, thing: str) -> None:
    """Item 11: ``tracehook publish --daemon`` finds a regular file or a FIFO at its agent
    socket path: it exits 2 naming the path and leaves the thing there. Before the fix it
    deleted whatever sat there (tests/test_publish.py has the directory and symlink)."""
    path = tmp_path / "agent.sock"
    if thing == "regular-file":
        path.write_text("precious")
    else:
        os.mkfifo(path)
    secret = tmp_path / "builder.secret"
    secret.write_text(crypto.format_secret_key(key("builderA")))
    secret.chmod(0o600)
    config = tmp_path / "sign.toml"
    config.write_text(f'publish-to = ["file://{tmp_path / "ts"}"]\n'
                      f'spool-dir = "{tmp_path / "spool"}"\n'
                      f'log-file = "{tmp_path / "publish.log"}"\nsecret-key-file = "{secret}"\n')
    proc = subprocess.run([EXE, "publish", "--daemon", "--config", str(config),
                           "--agent-socket", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr
    if thing == "regular-file":
        assert path.read_text() == "precious"
    else:
        assert path.is_fifo()


@pytest.mark.parametrize("depth", [33, 3000])
def test_policy_nested_too_deep(syn: Synthetic, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str], depth: int) -> None:
    """Item 11: a trust requirement nested 33 or 3,000 levels deep. ``tracehook policy
    check``, ``verify`` and ``gate`` exit 2 with one line naming the limit (32 levels), and
    a running gate whose policy file becomes this deep refuses everything (503) until it is
    fixed. Before the fix 3,000 levels crashed with a traceback and exit 1."""
    require = '"builderA"'
    for _ in range(depth):
        require = f"{{ any-of = [{require}] }}"
    deep = write_policy(tmp_path / "deep.toml", syn.traces, require, ["builderA"])
    gate_argv = ["gate", "--policy", str(deep), "--upstream", f"file://{syn.cache}",
                 "--store", str(syn.root), "--listen", "127.0.0.1:0"]
    verify_argv = ["verify", syn.ia_drv, "--policy", str(deep), "--store", str(syn.root)]
    for argv in (["policy", "check", str(deep)], verify_argv, gate_argv):
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "32 levels deep" in err, err
    policy = tmp_path / "policy.toml"
    shutil.copyfile(syn.policy, policy)
    with running_gate(policy, [f"file://{syn.cache}"], str(syn.root), tmp_path / "gate.log",
                      policy_interval=0.05) as gate:
        url = f"{gate.url}/{hash_part(syn.ia_out)}.narinfo"
        assert get(url).status == 200
        shutil.copyfile(deep, policy)
        time.sleep(0.2)
        reply = get(url)
    assert reply.status == 503 and "32 levels deep" in reply.text
    assert reply.text.count("\n") == 1, reply.text


# ----------------------------------------------------------------------------- held


def test_held_pipelined_requests_answered_in_order(syn: Synthetic, tmp_path: Path) -> None:
    """Held: three requests in one write on one connection (HTTP/1.1 pipelining) get three
    answers, in order, the last one the verified narinfo."""
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        host, port = gate.url.removeprefix("http://").split(":")
        ask = f"/{hash_part(syn.ia_out)}.narinfo"
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: gate\r\n\r\n"
                         b"GET /nar/0.nar HTTP/1.1\r\nHost: gate\r\n\r\n"
                         + f"GET {ask} HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n\r\n"
                         .encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", data) == [b"200", b"404", b"200"], data
    assert data.index(b"StoreDir:") < data.index(f"StorePath: {syn.ia_out}".encode())


ED25519_L = 2**252 + 27742317777372353535851937790883648493


def test_held_malleable_signature_is_a_bad_signature(
    syn: Synthetic, capsys: pytest.CaptureFixture[str]
) -> None:
    """Held: the trace's signature with S replaced by S + L (the same point equation holds,
    so a lax verifier accepts it: a malleable signature). libsodium refuses S >= L: the
    signature does not count, and it is reported as tamper evidence."""
    trace = _ia_trace(syn)
    (token,) = jws.parse_trace_file(trace.read_bytes())
    header, payload, sig = token.split(".")
    raw = jws.b64url_decode(sig, "signature")
    s = int.from_bytes(raw[32:], "little") + ED25519_L
    assert s < 2**256
    forged = jws.b64url_encode(raw[:32] + s.to_bytes(32, "little"))
    trace.write_text(json.dumps({"signatures": [f"{header}.{payload}.{forged}"]}))
    res = run_verify(capsys, *_verify_argv(syn))
    assert res.rc == 1 and "bad signature" in res.out, res.out
    assert "TAMPER EVIDENCE at hello" in res.out


def test_held_chain_10000_steps_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    """Held: a chain of 10,000 derivations, each the input of the next, without traces.
    The walk uses an explicit stack: with ``--max-depth 20000`` the target is refused
    naming the bottom step (no trace), not a RecursionError; by default the graph is
    refused as deeper than 2000 steps."""
    store = tmp_path / "root" / "nix" / "store"
    store.mkdir(parents=True)
    digest = hashlib.sha256(b"src").digest()
    src = make_fixed_output_path("flat", "sha256", digest, "src")
    drv = Derivation({"out": DerivationOutput(src, "sha256", digest.hex())}, {}, (),
                     "x86_64-linux", "/bin/sh", (), {"name": "src", "out": src})
    for i in range(10_001):
        path = derivation_path(drv)
        (store / basename(path)).write_bytes(encode_drv(serialize(drv)))
        drv = Derivation({"out": DerivationOutput("", "r:sha256", "")}, {path: ("out",)}, (),
                         "x86_64-linux", "/bin/sh", (), {"name": f"s{i}", "out": ""})
    top = path
    policy = write_policy(tmp_path / "policy.toml", tmp_path / "traces", '"builderA"',
                          ["builderA"])
    (tmp_path / "traces" / "traces").mkdir(parents=True)
    args = [top, "--policy", str(policy), "--store", str(tmp_path / "root")]
    deep = run_verify(capsys, *args, "--max-depth", "20000", "--json").json()
    assert deep["verified"] is False
    assert deep["failed_step"]["name"] == "s0" and "no trace" in deep["reason"]
    assert len(deep["steps"]) == 10_001
    default = run_verify(capsys, *args)
    assert default.rc == 1 and "deeper than 2000" in default.out, default.out


def _publish_config(tmp: Path, store: str) -> Path:
    config = tmp / "sign.toml"
    config.write_text(f'publish-to = ["{store}"]\nspool-dir = "{tmp / "spool"}"\n'
                      f'log-file = "{tmp / "publish.log"}"\n')
    return config


def test_held_two_publishers_and_kill_9(tmp_path: Path) -> None:
    """Held: two publishers drain one spool into one (slow) HTTP trace store at once, and
    one of them is killed with SIGKILL mid-way; a third run finishes. Every trace is in the
    store exactly once, and the spool holds nothing pending."""
    spool = Spool(tmp_path / "spool")
    entries = [make_entry(i) for i in range(30)]
    for entry in entries:
        spool.add(entry)
    with serve_traces() as server:
        server.state.delay = 0.02
        config = _publish_config(tmp_path, server.url)
        daemon = subprocess.Popen([EXE, "publish", "--daemon", "--no-agent", "--interval",
                                   "0.1", "--config", str(config)], stderr=subprocess.DEVNULL)
        other = subprocess.Popen([EXE, "publish", "--config", str(config)],
                                 stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(server.state.files) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        daemon.kill()
        daemon.wait(timeout=30)
        other.wait(timeout=120)
        assert cli.main(["publish", "--config", str(config)]) == 0
        stored = dict(server.state.files)
    assert len(stored) == 30
    for entry in entries:
        assert jws.parse_trace_file(stored[entry.key]) == [entry.jws]
    assert spool.pending() == [] and not list(spool.bad_dir.glob("*"))


def test_held_publishing_to_a_full_disk(tmp_path: Path) -> None:
    """Held: the ``file://`` trace store's disk is full (a 1 MiB tmpfs, filled, in a
    private mount namespace). ``tracehook publish`` exits 3, writes no partial or temporary
    file, and keeps every trace pending; once there is room again, everything is delivered,
    once."""
    spool = Spool(tmp_path / "spool")
    entries = [make_entry(i) for i in range(30)]
    for entry in entries:
        spool.add(entry)
    store, out = tmp_path / "store", tmp_path / "out"
    store.mkdir()
    config = _publish_config(tmp_path, f"file://{store}")
    script = f"""
set -e
mount -t tmpfs -o size=1m tmpfs {store}
mkdir {store}/traces
dd if=/dev/zero of={store}/filler bs=4096 2>/dev/null || true
set +e
{EXE} publish --config {config} 2>/dev/null; echo "first=$?"
ls -A {store}/traces; echo "pending=$(ls {spool.pending_dir} | wc -l)"
rm {store}/filler
{EXE} publish --config {config} 2>/dev/null; echo "second=$?"
cp -a {store}/traces {out}
"""
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, text=True, timeout=120, check=True)
    lines = proc.stdout.split()
    assert lines == ["first=3", ".lock", "pending=30", "second=0"], proc.stdout + proc.stderr
    for entry in entries:
        assert jws.parse_trace_file((out / entry.key).read_bytes()) == [entry.jws]
    assert spool.pending() == []
