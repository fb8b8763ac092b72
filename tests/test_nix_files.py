"""The Nix side of the project: every .nix file, the NixOS module, the VM test, the examples.

What runs here, with real Nix 2.26 and 2.8:

- every ``.nix`` file in the repository passes ``nix-instantiate --parse``;
- ``nix/tests/eval-module.nix`` evaluates the module under nixpkgs' ``lib.evalModules``
  with the ``lib`` of ``NIXPKGS_TREE`` or of the vendored NixOS 24.05 subset
  (tests/data/nixos-24.05-subset; the flake's ``checks.module-eval`` runs it with the
  flake's nixpkgs; tests/test_nixos_eval.py evaluates the module inside real NixOS systems);
- ``flake.lock`` is what real Nix accepts for ``flake.nix`` offline, without relocking;
- the module's trace-store and cache URL schemes are the ones the package opens, and its URL
  types accept exactly the URLs the package does;
- ``flake.nix`` is evaluated against a stand-in nixpkgs (the one ``lib`` function it calls,
  ``genAttrs``, and stub packages): its outputs, apps and checks are wired as documented;
- the VM test is evaluated the same way: its test script passes the pyflakes rules the
  NixOS test driver applies, its policy loads with the verifier's loader, its keys pair up,
  and its trace-tampering script really breaks the signature it targets and no other;
- every example configuration is read by the project's own loaders (sign.toml, the policies,
  the policy of the NixOS example), ``examples/nix.conf`` is accepted by real Nix without an
  unknown setting, and the systemd units' command lines parse with tracehook's CLI.
"""

from __future__ import annotations

import configparser
import json
import shlex
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from typing import Any

import pytest

from conftest import MakeNixEnv
from nixharness import REPO, NixEnv, NixTier
from seaweed import Seaweed
from tracehook import cli
from tracehook.errors import BadSignature
from tracehook.signer import config
from tracehook.stores.s3 import S3Client, S3Location, describe
from tracehook.trace import crypto, jws
from tracehook.verify.policy import Policy, load_policy, parse_policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

EXCLUDED_DIRS = {".git", ".venv", "build", "dist", "node_modules", "__pycache__", "result"}
STUB_STORE = "/nix/store/00000000000000000000000000000000"


def repo_nix_files() -> list[Path]:
    found = []
    for path in REPO.rglob("*.nix"):
        rel = path.relative_to(REPO)
        if not any(part in EXCLUDED_DIRS or part.endswith(".egg-info") for part in rel.parts):
            found.append(path)
    return sorted(found)


NIX_FILES = repo_nix_files()


def test_the_nix_files_are_found() -> None:
    names = {str(p.relative_to(REPO)) for p in NIX_FILES}
    assert {
        "flake.nix",
        "nix/package.nix",
        "nix/module.nix",
        "nix/tests/vm.nix",
        "nix/tests/eval-module.nix",
        "nix/tests/chain.nix",
        "examples/nixos/configuration.nix",
        "examples/flake-consumer/flake.nix",
    } <= names


@pytest.mark.nix
@pytest.mark.parametrize("path", NIX_FILES, ids=[str(p.relative_to(REPO)) for p in NIX_FILES])
def test_parses(nix_tier: NixTier, make_nixenv: MakeNixEnv, path: Path) -> None:
    env = make_nixenv(nix_tier)
    env.run("nix-instantiate", "--parse", str(path))


# ------------------------------------------------------------------ evaluating with Nix


def nix_eval(env: NixEnv, expr: str, *args: str, nix_path: str | None = None) -> Any:
    """``nix-instantiate --eval --strict --json`` of ``expr`` (read-write: toFile works)."""
    extra = {"NIX_PATH": nix_path} if nix_path is not None else None
    out = env.run(
        "nix-instantiate", "--read-write-mode", "--eval", "--strict", "--json",
        "--expr", expr, *args, extra_env=extra,
    ).stdout
    return json.loads(out)


EVAL_SCENARIOS = {
    "nothing-enabled", "sign", "sign-key-from-nix-settings", "sign-strict-and-settings",
    "gate-exclusive", "gate-shared", "exclusive-drops-extra-substituters",
    "exclusive-gate-trusting-no-key",
    "example-configuration", "gate-without-policy", "sign-without-key",
    "sign-beside-another-hook",
    "exclusive-gate-without-upstreams", "signing-key-without-public-key",
    "public-key-without-signing-key", "secret-in-store", "policy-mistakes", "type-errors",
}


@pytest.mark.nix
def test_module_evaluates_with_nixpkgs_lib(nix_tier: NixTier, make_nixenv: MakeNixEnv,
                                           nixos_tree: Path) -> None:
    """nix/module.nix under nixpkgs' ``lib.evalModules``, every scenario of eval-module.nix,
    with the ``lib`` of ``NIXPKGS_TREE`` or of the vendored NixOS 24.05 subset (the flake's
    ``checks.module-eval`` runs the same with the flake's nixpkgs)."""
    from nixoseval import module_scenarios

    result = module_scenarios(nixos_tree, make_nixenv(nix_tier))
    assert result["stubbed"] is True
    assert set(result["scenarios"]) == EVAL_SCENARIOS
    assert all(v is True for v in result["scenarios"].values())


def hunks(patch: str) -> list[tuple[str, list[str], list[str]]]:
    """(file, lines before, lines after) of every hunk of a unified diff."""
    found: list[tuple[str, list[str], list[str]]] = []
    target = ""
    for line in patch.splitlines():
        if line.startswith("+++ "):
            target = line[4:].split("\t")[0]
        elif line.startswith("@@"):
            found.append((target, [], []))
        elif found and line[:1] in (" ", "-", "+"):
            _, before, after = found[-1]
            if line[0] != "+":
                before.append(line[1:])
            if line[0] != "-":
                after.append(line[1:])
    return found


def contains(lines: list[str], block: list[str]) -> bool:
    return any(lines[i:i + len(block)] == block for i in range(len(lines) - len(block) + 1))


def test_nixos_tree_has_our_patches(nixos_tree: Path) -> None:
    """The tree the NixOS tests evaluate (the vendored subset, or ``NIXPKGS_TREE``) has both
    of our patches applied, hunk by hunk: the vendored patch files are what the tarball
    holds."""
    from nixoseval import SUBSET

    patches = sorted((SUBSET / "patches").glob("*.patch"))
    assert [p.name for p in patches] == ["nix.nix-restore-upstream.patch",
                                         "shellcheck-stub.patch"]
    for patch in patches:
        found = hunks(patch.read_text())
        assert found, patch
        for target, before, after in found:
            lines = (nixos_tree / target).read_text().splitlines()
            assert contains(lines, after), (patch.name, target, after)
            assert not contains(lines, before), (patch.name, target, before)


def test_vendored_nixos_tree_is_small_and_licensed() -> None:
    """The subset stays well under 20 MB, and carries the tree's MIT licence."""
    from nixoseval import SUBSET, SUBSET_TARBALL

    assert SUBSET_TARBALL.stat().st_size < 20_000_000
    licence = (SUBSET / "COPYING").read_text()
    assert licence.startswith("Copyright (c) 2003-2024 Eelco Dolstra and the Nixpkgs/NixOS")
    assert "Permission is hereby granted, free of charge" in licence
    with tarfile.open(SUBSET_TARBALL, "r:xz") as archive:
        copying = archive.extractfile("tree/COPYING")
        assert copying is not None and copying.read().decode() == licence


# A stand-in nixpkgs: just what flake.nix and vm.nix touch, so that their wiring evaluates.
STUB_NIXPKGS = """
let
  drv = name: { type = "derivation"; inherit name; outPath = "@STORE@-" + name; };
  pkgsFor = system: {
    inherit system;
    stdenv.hostPlatform.system = system;
    callPackage = _f: _args: drv "tracehook";
    runCommand = name: _env: _script: drv name;
    writeScriptBin = name: text: drv name // { inherit text; };
    writeShellScript = name: text: drv name // { inherit text; };
    fetchurl = args: drv "fetchurl" // { inherit (args) url hash; };
    unzip = drv "unzip";
    curl = drv "curl";
    python3.interpreter = "@STORE@-python3/bin/python3";
    busybox-sandbox-shell = drv "busybox";
    nixfmt-rfc-style = drv "nixfmt";
    testers.runNixOSTest = test: test // { type = "derivation"; outPath = "@STORE@-vm"; };
  };
  stubLib = {
    genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
    optional = cond: x: if cond then [ x ] else [ ];
    mkForce = x: x;
    escapeShellArgs = builtins.concatStringsSep " ";
  };
in {
  inherit pkgsFor stubLib;
  nixpkgs = {
    lib = stubLib;
    legacyPackages = stubLib.genAttrs [ "x86_64-linux" "aarch64-linux" ] pkgsFor;
  };
}
""".replace("@STORE@", STUB_STORE)


def flake_expr(body: str) -> str:
    return f"""
let
  stub = {STUB_NIXPKGS};
  flake = import {REPO}/flake.nix;
  self = flake.outputs {{ inherit self; inherit (stub) nixpkgs; }};
in {body}
"""


@pytest.mark.nix
def test_flake_outputs(nix226: NixTier, make_nixenv: MakeNixEnv) -> None:
    env = make_nixenv(nix226)
    out = nix_eval(env, flake_expr("""{
      inputs = flake.inputs;
      systems = builtins.attrNames self.packages;
      packages = builtins.attrNames self.packages.x86_64-linux;
      apps = builtins.mapAttrs (_: a: { inherit (a) type program; }) self.apps.x86_64-linux;
      checks = builtins.attrNames self.checks.x86_64-linux;
      vm = self.checks.x86_64-linux.vm.name;
      module = toString self.nixosModules.default;
      overlay = builtins.isFunction self.overlays.default;
      overlaid =
        (self.overlays.default stub.nixpkgs.legacyPackages.x86_64-linux { }).tracehook.name;
    }"""))
    assert out["inputs"] == {"nixpkgs": {"url": "github:NixOS/nixpkgs/nixos-24.05"}}
    assert out["systems"] == ["aarch64-linux", "x86_64-linux"]
    assert out["packages"] == ["default", "tracehook"]
    pkg = f"{STUB_STORE}-tracehook"
    assert out["apps"] == {
        "default": {"type": "app", "program": f"{pkg}/bin/tracehook"},
        "tracehook": {"type": "app", "program": f"{pkg}/bin/tracehook"},
        "tracehook-gate": {"type": "app", "program": f"{pkg}/bin/tracehook-gate"},
        "tracehook-post-build": {"type": "app", "program": f"{pkg}/bin/tracehook-post-build"},
    }
    assert out["checks"] == ["module-eval", "nixos-example", "package", "vm"]
    assert out["vm"] == "tracehook"
    assert out["module"] == str(REPO / "nix" / "module.nix")
    assert out["overlay"] is True
    assert out["overlaid"] == "tracehook"


def test_apps_are_console_scripts() -> None:
    """The flake's apps and the module's commands name executables the package installs."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"tracehook", "tracehook-gate", "tracehook-post-build"} <= set(scripts)
    sign = (REPO / "nix" / "module" / "sign.nix").read_text()
    assert "/bin/tracehook-post-build" in sign
    assert "/bin/tracehook publish --daemon" in sign
    gate = (REPO / "nix" / "module" / "gate.nix").read_text()
    assert "/bin/tracehook policy check" in gate and "/bin/tracehook gate" in gate


def test_module_parts_stay_small() -> None:
    """STYLE.md: modules of at most about 500 lines; the module is split by job."""
    parts = [REPO / "nix" / "module.nix", *sorted((REPO / "nix" / "module").glob("*.nix"))]
    assert len(parts) >= 5
    for part in parts:
        assert len(part.read_text().splitlines()) <= 500, part


@pytest.mark.nix
def test_module_url_schemes_are_the_packages(nix226: NixTier,
                                             make_nixenv: MakeNixEnv) -> None:
    """nix/module/lib.nix accepts exactly the trace-store and cache schemes the package opens
    (s3 joins both lists when the package supports it)."""
    from tracehook.errors import ConfigError
    from tracehook.stores.binarycache import open_upstream
    from tracehook.stores.tracestore import open_store

    env = make_nixenv(nix226)
    schemes = nix_eval(env, f"""
      let t = import {REPO}/nix/module/lib.nix {{ lib = {{ }}; }};
      in {{ inherit (t) traceStoreSchemes cacheSchemes; }}""")
    candidates = ["file", "http", "https", "s3", "ftp", "ssh", "gs"]

    def opens(opener: Any, scheme: str) -> bool:
        url = "file:///" if scheme == "file" else f"{scheme}://bucket.example.org/x"
        try:
            opener(url)
        except ConfigError:
            return False
        return True

    assert schemes["traceStoreSchemes"] == [c for c in candidates if opens(open_store, c)]
    assert schemes["cacheSchemes"] == [c for c in candidates if opens(open_upstream, c)]


# URLs the module's types must judge as the package does, as trace stores and as caches.
URL_CASES = (
    "s3://traces",
    "s3://traces?",
    "s3://traces?endpoint=s3.example.org:8333&scheme=http",
    "s3://traces/fleet-a/x?endpoint=h:1&scheme=https&region=eu-1&profile=p",
    "s3://Traces.example_1?region=",
    "s3://traces?endpoint=h:1&single-writer=1",
    "s3://traces?single-writer=no",
    "s3://traces?single-writer=maybe",
    "s3://traces?sheme=http",
    "s3://traces?scheme=ftp",
    "s3://traces?region=a&region=b",
    "s3://traces?endpoint",
    "s3://traces?&endpoint=h",
    "s3://traces?endpoint=http://h:1",
    "s3://traces?endpoint=h:1/path",
    "s3://tr",
    "s3://-traces",
    "s3://tra..ces",
    "s3://traces/pre%fix",
    "s3://traces/a b",
    "s3://traces#fragment",
    "s3://key:secret@traces",
    "https://traces.example.org",
    "https://traces.example.org/?single-writer=1",
    "https://traces.example.org?single-writer=yes",
    "https://traces.example.org/?x=1",
    "https://traces.example.org/?single-writer=1&x=1",
    "http://traces.example.org:8080/t",
    "http://traces.example.org:99999/t",
    "https://h/x#fragment",
    "file:///var/lib/tracehook/traces",
    "ftp://traces.example.org",
)


def package_accepts(url: str, store: bool) -> bool:
    """Whether the package takes ``url`` as a trace store (else as a binary cache), judging
    only the URL: an s3:// URL is parsed, not opened (opening looks up credentials)."""
    from tracehook.errors import ConfigError
    from tracehook.stores.binarycache import open_upstream
    from tracehook.stores.tracestore import open_store

    try:
        if url.startswith("s3://"):
            loc = S3Location.parse(url, "test")
            return store or not loc.single_writer
        if url.startswith("file://"):
            return True  # a directory that need not exist here
        (open_store if store else open_upstream)(url)
    except ConfigError:
        return False
    return True


@pytest.mark.nix
def test_module_url_types_are_the_packages(nixos_tree: Path, nix226: NixTier,
                                           make_nixenv: MakeNixEnv) -> None:
    """The module's URL types (publishTo, the policy's traces, upstreams) accept an s3:// or
    http(s):// URL exactly when the package does: bucket, prefix, parameters (each once,
    known, ``single-writer`` for trace stores only), port, fragment."""
    env = make_nixenv(nix226)
    urls = json.dumps(URL_CASES)
    got = nix_eval(env, f"""
      let
        lib = import {nixos_tree}/lib;
        t = import {REPO}/nix/module/lib.nix {{ inherit lib; }};
        urls = builtins.fromJSON {json.dumps(urls)};
      in {{
        store = map (t.validUrl true t.traceStoreSchemes) urls;
        cache = map (t.validUrl false t.cacheSchemes) urls;
      }}""")
    for kind, store in (("store", True), ("cache", False)):
        for url, nix_ok in zip(URL_CASES, got[kind], strict=True):
            assert nix_ok == package_accepts(url, store), (url, kind)


@pytest.mark.nix
def test_module_evidence_schema_is_the_packages(nix226: NixTier,
                                                make_nixenv: MakeNixEnv) -> None:
    """The policy submodule's evidence vocabulary (kinds, pinned AMD roots, TCB fields,
    measurement length) is the loader's."""
    from tracehook.trace.sevsnp import MEASUREMENT_LEN, TCB_FIELDS
    from tracehook.verify.evidencepolicy import AMD_ROOT_NAMES, EVIDENCE_KINDS

    env = make_nixenv(nix226)
    got = nix_eval(env, f"""
      let t = import {REPO}/nix/module/lib.nix {{ lib = {{ }}; }};
      in {{ inherit (t) evidenceKinds amdRoots tcbFields measurementHexDigits; }}""")
    assert got == {"evidenceKinds": list(EVIDENCE_KINDS), "amdRoots": list(AMD_ROOT_NAMES),
                   "tcbFields": list(TCB_FIELDS), "measurementHexDigits": 2 * MEASUREMENT_LEN}


def test_flake_lock_matches_the_flake() -> None:
    """The committed lock pins the input flake.nix names (github:NixOS/nixpkgs/nixos-24.05)."""
    lock = json.loads((REPO / "flake.lock").read_text())
    assert lock["version"] == 7 and lock["root"] == "root"
    assert lock["nodes"]["root"] == {"inputs": {"nixpkgs": "nixpkgs"}}
    node = lock["nodes"]["nixpkgs"]
    assert node["original"] == {"owner": "NixOS", "ref": "nixos-24.05", "repo": "nixpkgs",
                                "type": "github"}
    locked = node["locked"]
    assert locked["type"] == "github" and locked["owner"] == "NixOS"
    assert len(locked["rev"]) == 40 and locked["narHash"].startswith("sha256-")
    assert 'inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";' in (
        REPO / "flake.nix").read_text()


@pytest.mark.nix
def test_nix_accepts_flake_lock_offline(nix226: NixTier, make_nixenv: MakeNixEnv) -> None:
    """Real Nix 2.26 reads flake.lock as up to date for flake.nix: no relocking, no network."""
    env = make_nixenv(nix226)
    flake = env.base / "flake"
    flake.mkdir()
    for name in ("flake.nix", "flake.lock"):
        shutil.copy2(REPO / name, flake / name)
    res = env.run("nix", "--extra-experimental-features", "nix-command flakes", "flake",
                  "metadata", "--offline", "--no-update-lock-file", "--json", f"path:{flake}")
    meta = json.loads(res.stdout)
    lock = json.loads((REPO / "flake.lock").read_text())
    assert meta["locks"]["nodes"]["nixpkgs"] == lock["nodes"]["nixpkgs"]


# ------------------------------------------------------------------ the VM test


VM_NODE_ARGS = """{
  lib = stub.stubLib;
  pkgs = pkgs;
  nodes.cache.networking = {
    primaryIPAddress = "192.168.1.2";
    primaryIPv6Address = "2001:db8:1::2";
  };
}"""


def vm_expr(body: str) -> str:
    return f"""
let
  stub = {STUB_NIXPKGS};
  pkgs = stub.pkgsFor "x86_64-linux";
  test = import {REPO}/nix/tests/vm.nix {{ inherit pkgs; }};
  node = name: test.nodes.${{name}} {VM_NODE_ARGS};
in {body}
"""


@pytest.fixture(scope="module")
def vm_test(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """vm.nix evaluated against the stand-in nixpkgs (Nix 2.26)."""
    from nixharness import get_tier

    env = NixEnv(get_tier("2.26"), tmp_path_factory.mktemp("vmnix"))
    out: dict[str, Any] = nix_eval(env, vm_expr("""{
      inherit (test) name;
      nodes = builtins.attrNames test.nodes;
      testScript = test.testScript;
      bucketTool = (builtins.head (node "cache").environment.systemPackages).text;
      seaweedfs = (node "cache").systemd.services.seaweedfs.serviceConfig;
      identities = (node "cache").environment.etc."seaweedfs/identities.json".text;
      firewall = (node "cache").networking.firewall.allowedTCPPorts;
      consumer = (node "consumer").services.tracehook;
      builder = (node "builder").services.tracehook;
      imports = map toString ((node "consumer").imports ++ (node "builder").imports);
      secrets = {
        builder = (node "builder").environment.etc."tracehook-test/builder.sec".text;
        aws = (node "builder").environment.etc."tracehook-test/aws-credentials".text;
        gate = (node "consumer").environment.etc."tracehook-test/gate.sec".text;
      };
    }"""))
    return out


@pytest.mark.nix
def test_vm_test_structure(vm_test: dict[str, Any]) -> None:
    assert vm_test["name"] == "tracehook"
    assert vm_test["nodes"] == ["builder", "cache", "consumer"]
    assert set(vm_test["imports"]) == {str(REPO / "nix" / "module.nix")}
    gate = vm_test["consumer"]["gate"]
    assert gate["enable"] is True
    assert gate["upstreams"] == ["http://cache/cache"]
    assert gate["allowedIPs"] == ["192.168.1.2", "2001:db8:1::2"]
    sign = vm_test["builder"]["sign"]
    assert sign["enable"] is True
    assert sign["publishTo"] == gate["policy"]["traces"]
    assert [str(h) for h in sign["chainHooks"]] == [f"{STUB_STORE}-record-build"]
    assert "/var/log/chained-hook.log" in vm_test["testScript"]


@pytest.mark.nix
def test_vm_test_keys_pair_up(vm_test: dict[str, Any]) -> None:
    """The test's secret keys are the ones whose public halves the policy and nix.conf trust."""
    gate = vm_test["consumer"]["gate"]
    builder_sk = crypto.parse_secret_key(vm_test["secrets"]["builder"])
    gate_sk = crypto.parse_secret_key(vm_test["secrets"]["gate"])
    assert crypto.format_public_key(gate_sk.public) == gate["signingPublicKey"]
    policy = policy_from_nix(gate["policy"], "vm.nix policy")
    assert policy.key("vm-builder-1").public == builder_sk.public


@pytest.mark.nix
def test_vm_test_script_passes_the_drivers_lint(vm_test: dict[str, Any], tmp_path: Path) -> None:
    """The NixOS test driver runs pyflakes over testScript, machine names as builtins."""
    script = tmp_path / "testScript.py"
    script.write_text(vm_test["testScript"])
    compile(vm_test["testScript"], "testScript", "exec")
    builtins = ["start_all", "subtest", "builder", "cache", "consumer", "machines"]
    ruff = Path(sys.executable).parent / "ruff"
    res = subprocess.run(
        [str(ruff), "check", "--no-cache", "--isolated", "--select", "F",
         "--config", f"builtins = {json.dumps(builtins)}", str(script)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def laut_trace(sk: crypto.SecretKey, out_path: str) -> str:
    payload = {
        "in": {"rdrv_ia": "0" * 32},
        "out": {"nix": {"out": {"path": out_path, "hash": "sha256:" + "1" * 52}}},
    }
    return jws.sign_compact(sk, jws.laut_header(sk.name, sk.public, typ_jwt=True), payload)


@pytest.mark.nix
def test_vm_trace_store_is_seaweedfs(vm_test: dict[str, Any]) -> None:
    """The cache's SeaweedFS serves the bucket the builder publishes to, on the port its
    firewall opens, with the flags OPERATIONS.md gives; the builder's keys (its
    ``s3CredentialsFile``) are an identity that may write the bucket, anonymous readers (the
    gate) may only read; and the builder does not waive the conditional-PUT check."""
    sign = vm_test["builder"]["sign"]
    [url] = sign["publishTo"]
    loc = S3Location.parse(url, "vm.nix")
    assert loc.bucket == "traces" and loc.endpoint.host == "cache" and not loc.single_writer
    assert sign["s3CredentialsFile"] == "/etc/tracehook-test/aws-credentials"
    service = vm_test["seaweedfs"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/bin/weed") and argv[1] == "server" and "-s3" in argv
    flags = dict(a[1:].split("=", 1) for a in argv[2:] if "=" in a)
    assert flags["s3.port"] == str(loc.endpoint.port)
    assert int(flags["s3.port"]) in vm_test["firewall"]
    assert int(flags["filer.port"]) not in vm_test["firewall"]
    assert flags["master.electionTimeout"] == "1s"
    assert flags["s3.port.iceberg"] == flags["s3.port.lance"] == flags["metricsPort"] == "0"
    assert flags["master.telemetry"] == "false"
    assert service["TimeoutStopSec"] > 0 and service["StateDirectory"] == "seaweedfs"
    identities = {i["name"]: i for i in json.loads(vm_test["identities"])["identities"]}
    assert flags["s3.config"] == "/etc/seaweedfs/identities.json"
    ini = configparser.ConfigParser()
    ini.read_string(vm_test["secrets"]["aws"])
    keys = ini["default"]
    [builder] = [i for i in identities.values()
                 if {"accessKey": keys["aws_access_key_id"],
                     "secretKey": keys["aws_secret_access_key"]} in i.get("credentials", [])]
    assert {"Read:traces", "Write:traces"} <= set(builder["actions"])
    assert set(identities["anonymous"]["actions"]) == {"Read:traces", "List:traces"}


def put_object(client: S3Client, key: str, body: bytes) -> None:
    resp = client.request("PUT", key, body=body, retry=True, limit=1 << 16)
    assert resp.status == 200, describe(resp)


@pytest.mark.nix
def test_vm_bucket_tool_breaks_only_its_target(vm_test: dict[str, Any], seaweed: Seaweed,
                                               tmp_path: Path) -> None:
    """The VM test's ``bucket-traces`` against a real SeaweedFS (the build the VM runs):
    ``count`` sees the trace files but not the probe's, ``tamper`` rewrites the claims about
    its target through the filer, so that S3 readers get a payload whose signature no longer
    verifies, and leaves every other trace alone; a target no trace claims fails."""
    text = vm_test["bucketTool"]
    first, _, body = text.partition("\n")
    assert first == f"#!{STUB_STORE}-python3/bin/python3"
    script = tmp_path / "bucket-traces.py"
    script.write_text(body)
    sk = crypto.parse_secret_key(vm_test["secrets"]["builder"])
    target = "/nix/store/" + "a" * 32 + "-tracehook-vm-a"
    other = "/nix/store/" + "b" * 32 + "-tracehook-vm-b"
    bucket = seaweed.bucket("vmtraces")
    client = seaweed.client(bucket)
    try:
        put_object(client, "traces/" + "1" * 32, jws.render_trace_file([laut_trace(sk, target)]))
        put_object(client, "traces/" + "2" * 32, jws.render_trace_file([laut_trace(sk, other)]))
        put_object(client, "traces/.tracehook-probe", jws.render_trace_file([]))
        base = f"http://127.0.0.1:{seaweed.ports[2]}/buckets/{bucket}/traces"

        def tool(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                                  text=True, timeout=60, check=False)

        res = tool("count", base)
        assert (res.returncode, res.stdout.strip()) == (0, "2"), res.stderr
        res = tool("tamper", base, target)
        assert res.returncode == 0, res.stderr
        got = {k: client.request("GET", f"traces/{k * 32}", retry=True).body for k in "12"}
    finally:
        client.close()
    [tampered] = jws.parse_trace_file(got["1"])
    [untouched] = jws.parse_trace_file(got["2"])
    with pytest.raises(BadSignature):
        jws.verify(jws.parse_compact(tampered), sk.public)
    jws.verify(jws.parse_compact(untouched), sk.public)
    res = tool("tamper", base, "/nix/store/none-x")
    assert res.returncode != 0, "a target no trace claims must fail the test, not pass it"


# ------------------------------------------------------------------ examples


EXAMPLES = REPO / "examples"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(doc: dict[str, Any]) -> str:
    """TOML for the JSON of a Nix attribute set, as pkgs.formats.toml renders it."""
    lines = [
        f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)
    ]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{json.dumps(name)}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def policy_from_nix(attrs: dict[str, Any], source: str) -> Policy:
    return parse_policy(to_toml(attrs), source)


def test_sign_toml_example_loads() -> None:
    cfg = config.load(EXAMPLES / "sign.toml", environ={})
    assert cfg.secret_key_file == Path("/etc/nix/builder.sec")
    assert cfg.publish_to == ("file:///var/lib/tracehook/traces", "https://traces.example.org")
    assert cfg.spool_dir == config.DEFAULT_SPOOL
    assert cfg.log_file == config.DEFAULT_LOG
    assert cfg.strict is False


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("policy-*.toml")), ids=lambda p: p.name)
def test_policy_examples_load(path: Path) -> None:
    assert load_policy(path).keys


@pytest.mark.nix
def test_nixos_example_options(nix226: NixTier, make_nixenv: MakeNixEnv) -> None:
    """The NixOS example's values, read by Nix, satisfy the signer's and verifier's loaders."""
    env = make_nixenv(nix226)
    cfg = nix_eval(env, f"(import {EXAMPLES}/nixos/configuration.nix {{ }}).services.tracehook")
    policy = policy_from_nix(cfg["gate"]["policy"], "configuration.nix")
    assert {k.name for k in policy.keys} == {"mine", "rebuilderX", "rebuilderY"}
    pub = crypto.parse_public_key(cfg["gate"]["signingPublicKey"])
    assert crypto.format_public_key(pub) == cfg["gate"]["signingPublicKey"]
    sign = cfg["sign"]
    rendered = tmp = env.base / "sign.toml"
    tmp.write_text(to_toml({"secret-key-file": sign["secretKeyFile"],
                            "publish-to": sign["publishTo"]}))
    assert config.load(rendered, environ={}).publish_to == tuple(sign["publishTo"])


@pytest.mark.nix
def test_flake_consumer_example(nix226: NixTier, make_nixenv: MakeNixEnv) -> None:
    env = make_nixenv(nix226)
    out = nix_eval(env, f"""
      let f = import {EXAMPLES}/flake-consumer/flake.nix; in
      {{ inputs = f.inputs; outputs = builtins.isFunction f.outputs; }}""")
    assert out["inputs"]["tracehook"]["url"] == "path:../.."
    assert out["inputs"]["tracehook"]["inputs"] == {"nixpkgs": {"follows": "nixpkgs"}}
    assert out["outputs"] is True


def nix_conf_settings(text: str) -> dict[str, str]:
    settings = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


@pytest.mark.nix
def test_nix_conf_example_is_accepted_by_nix(nix_tier: NixTier, make_nixenv: MakeNixEnv) -> None:
    """Nix reads examples/nix.conf with no unknown setting, and shows each value as written."""
    env = make_nixenv(nix_tier)
    conf_dir = env.base / "example-conf"
    conf_dir.mkdir()
    text = (EXAMPLES / "nix.conf").read_text()
    (conf_dir / "nix.conf").write_text(text)
    show = ["show-config"] if nix_tier.name == "2.8" else ["config", "show"]
    res = env.run(
        "nix", "--extra-experimental-features", "nix-command", *show,
        extra_env={"NIX_CONF_DIR": str(conf_dir), "NIX_USER_CONF_FILES": ""},
    )
    assert "unknown setting" not in res.stderr
    assert "warning" not in res.stderr, res.stderr
    shown = nix_conf_settings(res.stdout)
    for key, value in nix_conf_settings(text).items():
        assert shown.get(key) == value, (key, shown.get(key), value)


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> every value (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not KEY=VALUE"
        current.setdefault(key, []).append(value)
    return sections


def exec_argv(unit: dict[str, dict[str, list[str]]]) -> list[str]:
    [line] = unit["Service"]["ExecStart"]
    return shlex.split(line.replace("%d", "/run/credentials/x"))


def test_gate_unit_matches_cli_and_nix_conf() -> None:
    unit = unit_file(EXAMPLES / "systemd" / "tracehook-gate.service")
    argv = exec_argv(unit)
    assert argv[0].endswith("/tracehook")
    args = cli.build_parser(argv[1:]).parse_args(argv[1:])
    assert args.command == "gate"
    assert args.policy == "/etc/tracehook/policy.toml"
    assert args.signing_key == "/run/credentials/x/signing-key"
    assert unit["Service"]["LoadCredential"] == ["signing-key:/etc/tracehook/gate.sec"]
    assert unit["Service"]["DynamicUser"] == ["yes"]
    conf = nix_conf_settings((EXAMPLES / "nix.conf").read_text())
    assert conf["substituters"] == f"http://{args.listen}"
    assert args.log_file.startswith("/var/log/" + unit["Service"]["LogsDirectory"][0] + "/")


def test_publish_unit_matches_cli_and_sign_toml() -> None:
    unit = unit_file(EXAMPLES / "systemd" / "tracehook-publish.service")
    argv = exec_argv(unit)
    args = cli.build_parser(argv[1:]).parse_args(argv[1:])
    assert args.command == "publish" and args.daemon is True
    cfg = config.load(EXAMPLES / "sign.toml", environ={})
    writable = " ".join(unit["Service"]["ReadWritePaths"]).split()
    assert str(cfg.spool_dir) in writable
    assert cfg.log_file is not None and str(cfg.log_file.parent) in writable
    conf = nix_conf_settings((EXAMPLES / "nix.conf").read_text())
    assert conf["post-build-hook"].rsplit("/", 1)[0] == argv[0].rsplit("/", 1)[0]


def test_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` knows every directive (a typo would be silently ignored)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        warnings.warn("systemd-analyze not installed: units only parsed, not verified",
                      stacklevel=1)
        for unit in (EXAMPLES / "systemd").glob("*.service"):
            assert unit_file(unit)["Service"]["ExecStart"]
        return
    tracehook = Path(sys.executable).parent / "tracehook"
    units = []
    for unit in sorted((EXAMPLES / "systemd").glob("*.service")):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/tracehook/.venv/bin/tracehook",
                                                 str(tracehook)))
        units.append(str(copy))
    res = subprocess.run([analyze, "verify", *units], capture_output=True, text=True,
                         timeout=60, check=False)
    output = res.stdout + res.stderr
    assert "Unknown" not in output and "nknown key" not in output, output
    assert "not executable" not in output, output
