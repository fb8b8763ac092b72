"""The NixOS module inside real NixOS evaluations (issue 16), with real Nix 2.26.

Needs a nixpkgs tree: ``NIXPKGS_TREE=DIR`` (on the project's machines, the shared
``nixos-eval/setup.sh`` beside the clone prepares a NixOS 24.05 tree from a fetched snapshot;
this repository holds none and reads nothing beside itself). Without it every test here is
reported as not run: a warning and a skip reason that name ``NIXPKGS_TREE``; none fails for
lack of it.

What runs, to keep the cost down (a NixOS evaluation takes seconds and most of a GB):

- one evaluation (``nix/tests/nixos-eval.nix``) of every configuration that must work or must
  fail an assertion: the README's configuration (toplevel instantiated, nix.conf, sign.toml,
  the policy, both units, the hook, the docs), the example configuration, chained hooks, Lix
  as ``nix.package``, the exclusive-mode holes, the renamed options, and every assertion;
- one evaluation per type error (those abort the evaluation; their message is the point):
  a policy typo, an unknown policy attribute, a nameless key, port 99999, ``require = 5``,
  a bad ``not-after``, an unknown trace-store scheme;
- ``systemd-analyze security --offline=yes`` on the rendered units (publisher <= 2.0,
  gate <= 1.3), ``systemd-tmpfiles`` on the rendered rules, real Nix reading the rendered
  nix.conf, the project's loaders reading sign.toml and the policy;
- the package's source as Nix copies it (git-tracked files only).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from nixharness import REPO, NixEnv, get_tier
from tracehook import cli
from tracehook.signer import config as sign_config
from tracehook.verify.policy import load_policy, parse_policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

TREE_ENV = "NIXPKGS_TREE"
HARNESS = REPO / "nix" / "tests" / "nixos-eval.nix"
MODULE = REPO / "nix" / "module.nix"

GATE_URL = "http://127.0.0.1:37515"
GATE_KEY = "gate.example.org-1:CKG4BAT8XnE2/uKXZNO+aGufgPgspiw5BFZD/fK0PqA="
BUILDER_KEY = "builder.example.org-1:diZIhvLSthXHFH+qz5dY/Fegz/u7Z+8aMekjrabc+fI="
OTHER_KEY = "rebuilder-x.example.org-1:Dwxy6SpfvApt2NHfA8luc1Lj6sobZoX99epUTo3im6M="
STORE_SECRET = "/nix/store/00000000000000000000000000000000-builder.sec"

pytestmark = pytest.mark.nix


@pytest.fixture(scope="module")
def tree() -> Path:
    value = os.environ.get(TREE_ENV, "")
    if not value or not (Path(value) / "nixos" / "lib" / "eval-config.nix").is_file():
        why = (
            f"not run: {TREE_ENV} does not name a nixpkgs tree, so nix/module.nix was not "
            f"evaluated inside a real NixOS system (set {TREE_ENV}=DIR; "
            "the project's nixos-eval/setup.sh prepares one)"
        )
        warnings.warn(why, stacklevel=1)
        pytest.skip(why)
    return Path(value).resolve()


@pytest.fixture(scope="module")
def nixos_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NixEnv]:
    env = NixEnv(get_tier("2.26"), tmp_path_factory.mktemp("nixos"))
    yield env
    shutil.rmtree(env.base, ignore_errors=True)


def evaluate(env: NixEnv, expr: str, *, read_write: bool = False) -> Any:
    args = ["--eval", "--strict", "--json", "--expr", expr]
    res = env.run("nix-instantiate", *(["--read-write-mode"] if read_write else []), *args,
                  timeout=600)
    return json.loads(res.stdout)


def evaluation_error(env: NixEnv, expr: str) -> str:
    """The error of an evaluation that must fail (AssertionError if it succeeds)."""
    res = env.run("nix-instantiate", "--eval", "--strict", "--expr", expr, check=False,
                  timeout=600)
    assert res.returncode != 0, f"evaluated, but must fail: {res.stdout[:300]}"
    return " ".join(res.stderr.split())


def harness(tree: Path) -> str:
    return f"import {HARNESS} {{ nixpkgs = {tree}; }}"


# ------------------------------------------------------------------ configurations


def readme_configuration() -> str:
    """The README's NixOS example, with the flake's module replaced by its path."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## NixOS\n"):]
    block = section[section.index("```nix\n") + len("```nix\n"):]
    block = block[: block.index("```")]
    assert "tracehook.nixosModules.default" in block
    return block.replace("tracehook.nixosModules.default", str(MODULE))


GATE = f"""
  services.tracehook.gate = {{
    enable = true;
    upstreams = [ "https://cache.example.org" ];
    policy = {{
      traces = [ "https://traces.example.org" ];
      keys.mine = "{BUILDER_KEY}";
      trust.require = "mine";
    }};
    secretKeyFile = "/var/lib/secrets/gate.sec";
    signingPublicKey = "{GATE_KEY}";
  }};
"""


def gate_with(body: str, *, gate: str = GATE) -> str:
    """A module: the gate above, then ``body`` (merged, so both may set the same options)."""
    return ("{ lib, pkgs, ... }: {\n  config = lib.mkMerge [\n"
            f"{{ {gate} }}\n{{ {body} }}\n  ];\n}}\n")


def policy_gate(policy: str, key: str = BUILDER_KEY) -> str:
    """The gate with ``policy`` (``@KEY@`` standing for ``key``) instead of its own."""
    policy = policy.replace("@KEY@", key)
    return gate_with(f"services.tracehook.gate.policy = lib.mkForce {policy};")


# Configurations that must work: name -> (module text, whole system too).
WORKING = {
    "readme": (readme_configuration(), True),
    "example": (f"import {REPO}/examples/nixos/configuration.nix", True),
    "lix": ("""{ pkgs, ... }: {
      nix.package = pkgs.lix;
      services.tracehook.sign = {
        enable = true;
        secretKeyFile = "/etc/nix/builder.sec";
        publishTo = [ "https://traces.example.org" ];
      };
    }""", False),
    # Everything that used to reach nix.conf around an exclusive gate.
    "holes": (gate_with(f"""
      nix.settings = {{
        substituters = [ "https://mine.example.org" ];
        extra-substituters = [ "https://sneaky.example.org" ];
        trusted-substituters = [ "https://trusted.example.org" ];
        extra-trusted-substituters = [ "https://extra-trusted.example.org" ];
        trusted-public-keys = [ "{OTHER_KEY}" ];
        extra-trusted-public-keys = [ "{OTHER_KEY}" ];
        trusted-users = [ "root" "@wheel" ];
      }};
      nix.extraOptions = ''
        !include /etc/nix/access-tokens.conf
      '';
    """), False),
    "shared": (gate_with("""
      services.tracehook.gate.exclusive = false;
      nix.settings.extra-substituters = [ "https://sneaky.example.org" ];
    """), False),
    "renamed": (gate_with(
        'services.tracehook.gate.signingKeyFile = "/var/lib/secrets/old-name.sec";',
        gate=GATE.replace('secretKeyFile = "/var/lib/secrets/gate.sec";', ""),
    ), False),
}

# Configurations that must fail assertions; each carries several independent mistakes (an
# evaluation is expensive, and all failed assertions are reported at once).
FAILING = {
    "mistakes": gate_with(f"""
      services.tracehook.gate.secretKeyFile = lib.mkForce null;
      services.tracehook.sign = {{
        enable = true;
        secretKeyFile = "{STORE_SECRET}";
        environmentFile = ./publish.env;
      }};
      nix.extraOptions = ''
        extra-substituters = https://sneaky.example.org
        trusted-public-keys = x:y
        post-build-hook = /etc/nix/other-hook.sh
      '';
      nix.settings.post-build-hook = "/etc/nix/upload-to-cache.sh";
      nix.settings.substituters = lib.mkForce [ "https://forced.example.org" ];
      nix.settings.require-sigs = false;
      nix.settings.binary-caches = [ "https://old.example.org" ];
      services.tracehook.gate.policy = lib.mkForce {{
        evidence.a = {{ kind = "sev-snp"; measurements = [ "{"ab" * 48}" ]; roots = [ ]; }};
        keys.a = "{BUILDER_KEY}";
        keys.b = "{BUILDER_KEY.replace("builder.example.org-1", "again")}";
        trust.require.any-of = [
          {{ threshold = 3; of = [ "a" "b" ]; }}
          {{ all-of = [ "a" "ghost" {{ any-of = [ "a" ]; }} ]; }}
          {{ all-of = [ "a" {{ narinfo-key = "{GATE_KEY}"; }} ]; }}
          {{ of = [ "a" ]; all-of = [ "b" ]; }}
          {{ any-of = [ "a" ]; threshold = 1; }}
        ];
      }};
    """),
    "more-mistakes": """{ pkgs, ... }: {
      services.tracehook.gate = {
        enable = true;
        upstreams = [ "https://cache.example.org" ];
        policy = ./policy.toml;
        secretKeyFile = "${pkgs.writeText "gate.sec" "x"}";
      };
      services.tracehook.sign.enable = true;
    }""",
}

# Type errors abort the evaluation: one process each. (configuration, option, message part)
TYPE_ERRORS = {
    "policy-typo": (
        policy_gate('{ keys.a = "@KEY@"; trust.requir = "a"; }'),
        "The option `services.tracehook.gate.policy.trust.requir' does not exist",
    ),
    "policy-unknown-table": (
        policy_gate('{ kyes.a = "@KEY@"; trust.require = "a"; }'),
        "The option `services.tracehook.gate.policy.kyes' does not exist",
    ),
    "nameless-key": (
        policy_gate('{ keys.a = "@KEY@"; trust.require = "a"; }',
                    key=BUILDER_KEY[BUILDER_KEY.index(":"):]),
        "A definition for option `services.tracehook.gate.policy.keys.a' is not of type "
        "`Nix public key",
    ),
    "require-not-a-node": (
        policy_gate('{ keys.a = "@KEY@"; trust.require = 5; }'),
        "A definition for option `services.tracehook.gate.policy.trust.require' is not of "
        "type `trust requirement",
    ),
    "bad-not-after": (
        policy_gate('{ keys.a = { key = "@KEY@"; not-after = "2027-13-01T00:00:00Z"; }; '
                    'trust.require = "a"; }'),
        "A definition for option `services.tracehook.gate.policy.keys.a.not-after' is not of "
        "type `null or RFC 3339 date or date-time with a zone",
    ),
    "port-99999": (
        gate_with('services.tracehook.gate.listen = "127.0.0.1:99999";'),
        "A definition for option `services.tracehook.gate.listen' is not of type `loopback "
        "`HOST:PORT`",
    ),
    "unknown-trace-store-scheme": (
        "{ ... }: { services.tracehook.sign = { enable = true; "
        'secretKeyFile = "/k"; publishTo = [ "ftp://traces.example.org" ]; }; }',
        "A definition for option `services.tracehook.sign.publishTo",
    ),
    "gate-public-key-typo": (
        gate_with('services.tracehook.gate.signingPublicKey = lib.mkForce "gate-1:abc";'),
        "A definition for option `services.tracehook.gate.signingPublicKey' is not of type",
    ),
}


def write_configurations(directory: Path, configs: dict[str, str]) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "publish.env").write_text("")
    shutil.copy2(REPO / "examples" / "policy-my-builder.toml", directory / "policy.toml")
    paths = {}
    for name, text in configs.items():
        path = directory / f"{name}.nix"
        path.write_text(text)
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def evaluated(tree: Path, nixos_env: NixEnv) -> dict[str, Any]:
    """Every working and every assertion-failing configuration, in one evaluation."""
    configs = {name: text for name, (text, _) in WORKING.items()} | FAILING
    paths = write_configurations(nixos_env.base / "configs", configs)
    parts = [f"{n} = let e = h.eval [ {paths[n]} ]; in h.facts e"
             + (" // h.whole e" if whole else "") + ";"
             for n, (_, whole) in WORKING.items()]
    parts += [f"{n} = h.brief (h.eval [ {paths[n]} ]);" for n in FAILING]
    policies = " ".join(f'"{p.name}" = h.policy ({nix_value(tomllib.loads(p.read_text()))});'
                        for p in EXAMPLE_POLICIES)
    parts.append(f"policies = {{ {policies} }};")
    out: dict[str, Any] = evaluate(
        nixos_env, f"let h = {harness(tree)}; in {{ {' '.join(parts)} package = h.package; }}"
    )
    return out


EXAMPLE_POLICIES = sorted((REPO / "examples").glob("policy-*.toml"))


def nix_value(value: Any) -> str:
    """A TOML value as a Nix expression, dates as RFC 3339 strings (the module's form)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value).replace("${", "\\${")
    if isinstance(value, (dt.datetime, dt.date)):
        return json.dumps(value.isoformat())
    if isinstance(value, list):
        return "[ " + " ".join(f"({nix_value(v)})" for v in value) + " ]"
    if isinstance(value, dict):
        return "{ " + " ".join(f"{json.dumps(k)} = {nix_value(v)};"
                               for k, v in value.items()) + " }"
    raise TypeError(value)


def conf_settings(text: str) -> dict[str, str]:
    settings = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def messages(entry: dict[str, Any]) -> str:
    return " ".join(" ".join(entry["failed"] + entry["warnings"]).split())


# ------------------------------------------------------------------ the README configuration


def test_readme_configuration_instantiates(evaluated: dict[str, Any]) -> None:
    readme = evaluated["readme"]
    assert readme["failed"] == []
    assert readme["warnings"] == []
    assert readme["toplevel"].endswith(".drv") and "nixos-system" in readme["toplevel"]


def test_example_configuration_instantiates(evaluated: dict[str, Any]) -> None:
    example = evaluated["example"]
    assert example["failed"] == [] and example["warnings"] == []
    assert example["toplevel"].endswith(".drv")
    gate = unit_sections(example["units"]["gate"])["Service"]
    assert "IPAddressDeny" not in gate, "allowedIPs is commented out in the example"


def test_readme_nix_conf_has_only_the_gate(evaluated: dict[str, Any]) -> None:
    conf = conf_settings(evaluated["readme"]["nixConf"])
    assert conf["substituters"] == GATE_URL
    assert conf["trusted-public-keys"] == GATE_KEY
    for key in ("trusted-substituters", "extra-substituters", "extra-trusted-substituters",
                "extra-trusted-public-keys"):
        assert conf[key] == "", key
    assert conf["narinfo-cache-positive-ttl"] == conf["narinfo-cache-negative-ttl"] == "0"
    assert conf["post-build-hook"].startswith("/nix/store/")


def test_readme_policy_renders_and_loads(evaluated: dict[str, Any], tmp_path: Path) -> None:
    text = evaluated["readme"]["policyToml"]
    assert "not-after = 2027-06-01T00:00:00Z" in text, "not-after must be a TOML date-time"
    path = tmp_path / "policy.toml"
    path.write_text(text)
    policy = load_policy(path)
    assert {k.name for k in policy.keys} == {"mine", "old"}
    old = policy.key("old")
    assert old.not_after is not None and old.not_after.isoformat() == "2027-06-01T00:00:00+00:00"
    assert policy.describe() == "any of (mine, old)"
    assert cli.main(["policy", "check", str(path)]) == 0


@pytest.mark.parametrize("path", EXAMPLE_POLICIES, ids=lambda p: p.name)
def test_policy_examples_round_trip(evaluated: dict[str, Any], path: Path) -> None:
    """Every example policy, written as the module's attribute set, renders to a file the
    loader reads as the very same policy: the typed submodule mirrors the schema exactly."""
    rendered = evaluated["policies"][path.name]
    assert rendered["problems"] == []
    ours = parse_policy(rendered["text"], "rendered", base_dir=path.parent)
    theirs = load_policy(path)
    assert ours.traces == theirs.traces
    # Nix sorts attribute names; order in [keys] and [evidence] carries no meaning.
    assert sorted(ours.keys, key=str) == sorted(theirs.keys, key=str)
    assert ours.narinfo_keys == theirs.narinfo_keys
    assert ours.require == theirs.require
    assert sorted(ours.evidence, key=str) == sorted(theirs.evidence, key=str)
    assert ours.weak_fixed_output_hashes == theirs.weak_fixed_output_hashes


def test_readme_sign_toml_loads(evaluated: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "sign.toml"
    path.write_text(evaluated["readme"]["signToml"])
    cfg = sign_config.load(path, environ={})
    assert cfg.secret_key_file == Path("/etc/nix/builder.sec")
    assert cfg.publish_to == ("file:///var/lib/tracehook/traces", "https://traces.example.org")
    assert cfg.spool_dir == Path("/var/lib/tracehook/spool")
    assert cfg.chain_hooks == ("/etc/nix/upload-to-cache.sh",)
    assert cfg.agent_socket == Path("/run/tracehook/agent.sock")
    assert cfg.nix_flavor is None and cfg.nix_version is None, "the signer detects them"
    text = evaluated["readme"]["signToml"]
    assert 'chain-hooks = ["/etc/nix/upload-to-cache.sh"]' in text
    assert 'agent-user = "tracehook"' in text


def test_gate_command_line_parses(evaluated: dict[str, Any]) -> None:
    start = evaluated["readme"]["gateStart"]
    line = start.strip().splitlines()[-1]
    words = re.findall(r"'([^']*)'|(\S+)", line)
    argv = [a or b for a, b in words]
    assert argv[0] == "exec" and argv[1].endswith("/bin/tracehook")
    args = cli.build_parser(argv[2:]).parse_args(argv[2:])
    assert args.command == "gate"
    assert args.policy == "/etc/tracehook/policy.toml"
    assert args.listen == "127.0.0.1:37515"
    assert args.upstream == ["https://cache.example.org"]
    assert args.signing_key == "/run/credentials/tracehook-gate.service/signing-key"
    assert args.log_file == "/var/log/tracehook-gate/gate.log"
    assert args.cache_dir == "/var/cache/tracehook-gate"
    service = unit_sections(evaluated["readme"]["units"]["gate"])["Service"]
    assert service["CacheDirectory"] == ["tracehook-gate"]
    assert service["LogsDirectory"] == ["tracehook-gate"]


def test_gate_unit_reloads_and_checks_the_policy(evaluated: dict[str, Any]) -> None:
    unit = unit_sections(evaluated["readme"]["units"]["gate"])
    service = unit["Service"]
    check = [c for c in service["ExecStartPre"] if "policy check" in c]
    assert check and check[0].endswith("/bin/tracehook policy check '/etc/tracehook/policy.toml'")
    assert service["ExecReload"][0] == check[0]
    assert re.fullmatch(r"/nix/store/\S+/bin/kill -HUP \$MAINPID", service["ExecReload"][1])
    assert unit["Unit"]["X-Reload-Triggers"], "a new policy must reload the gate"
    assert service["Restart"] == ["always"]
    assert service["DynamicUser"] == ["true"]
    assert service["LoadCredential"] == ["signing-key:/var/lib/secrets/gate.sec"]
    assert "ReadOnlyPaths" not in service, "the gate never opens the store database"
    assert service["PrivateMounts"] == ["true"] and service["DeviceAllow"] == [""]
    assert "~@resources" in service["SystemCallFilter"]
    assert service["LimitNOFILE"] == ["65536"]


def test_publisher_unit_is_unprivileged(evaluated: dict[str, Any]) -> None:
    readme = evaluated["readme"]
    service = unit_sections(readme["units"]["publish"])["Service"]
    assert service["User"] == ["tracehook"] and service["Group"] == ["tracehook"]
    assert service["LoadCredential"] == ["secret-key:/etc/nix/builder.sec"]
    assert "@system-service" in service["SystemCallFilter"]
    assert service["CapabilityBoundingSet"] == [""]
    assert set(service["ReadWritePaths"]) == {
        "/var/lib/tracehook/spool", "/var/log/tracehook", "/var/lib/tracehook/traces"}
    assert service["PrivateUsers"] == ["false"], "SO_PEERCRED must see the hook as root"
    assert readme["users"] == {"tracehook": {"isSystemUser": True, "group": "tracehook"}}
    start = readme["publishStart"]
    assert 'TRACEHOOK_SECRET_KEY_FILE="$CREDENTIALS_DIRECTORY/secret-key"' in start
    assert "publish --daemon --config /etc/tracehook/sign.toml" in start
    argv = start.split("exec ", 1)[1].replace("\\\n", " ").split()
    args = cli.build_parser(argv[1:]).parse_args(argv[1:])
    assert args.daemon and str(args.config) == "/etc/tracehook/sign.toml"
    assert service["RuntimeDirectory"] == ["tracehook"]
    assert service["RuntimeDirectoryMode"] == ["0750"], "the hook refuses a writable directory"


def test_state_directories(evaluated: dict[str, Any], tmp_path: Path) -> None:
    rules = evaluated["readme"]["tmpfiles"]
    assert rules == [
        "d /var/lib/tracehook/spool 2770 tracehook tracehook -",
        "Z /var/lib/tracehook/spool - tracehook tracehook -",
        "d /var/log/tracehook 2750 tracehook tracehook -",
        "f /var/log/tracehook/sign.log 0640 tracehook tracehook -",
        "d /var/lib/tracehook/traces 0755 tracehook tracehook -",
    ]
    tmpfiles = shutil.which("systemd-tmpfiles")
    if tmpfiles is None:
        warnings.warn("systemd-tmpfiles not installed: the rules were not applied",
                      stacklevel=1)
        return
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n"
                                         "tracehook:x:990:990::/var/empty:/bin/false\n")
    (root / "etc" / "group").write_text("root:x:0:\ntracehook:x:990:\n")
    conf = tmp_path / "tracehook.conf"
    conf.write_text("\n".join(rules) + "\n")
    res = subprocess.run([tmpfiles, "--create", f"--root={root}", str(conf)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    for rel, mode in (("var/lib/tracehook/spool", 0o2770), ("var/log/tracehook", 0o2750),
                      ("var/log/tracehook/sign.log", 0o640),
                      ("var/lib/tracehook/traces", 0o755)):
        st = (root / rel).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, 990, 990), rel


def test_hook_runs_the_daemons_nix(evaluated: dict[str, Any]) -> None:
    for name in ("readme", "lix"):
        facts = evaluated[name]
        hook = facts["hook"]
        assert "export TRACEHOOK_CONFIG=/etc/tracehook/sign.toml" in hook
        assert f"export PATH={facts['nixPackage']}/bin${{PATH:+:$PATH}}" in hook
        assert f"exec {facts['package']}/bin/tracehook-post-build" in hook
        env = unit_sections(facts["units"]["publish"])["Service"]["Environment"]
        path = next(e for e in env if e.startswith('"PATH='))
        assert path.startswith(f'"PATH={facts["nixPackage"]}/bin:'), path
    assert "-lix-" in evaluated["lix"]["nixPackage"]


def test_option_docs_render(evaluated: dict[str, Any]) -> None:
    docs = {d["name"]: d for d in evaluated["readme"]["docs"]}
    assert "services.tracehook.package" in docs
    assert docs["services.tracehook.package"]["default"]["text"] == "pkgs.tracehook"
    for name, doc in docs.items():
        default = json.dumps(doc["default"])
        assert "/nix/store" not in default, f"{name}: a default computed from the system"


# ------------------------------------------------------------------ the items


def test_chain_hooks_reach_sign_toml(evaluated: dict[str, Any], tmp_path: Path) -> None:
    """``sign.chainHooks = [ "/etc/nix/upload-to-cache.sh" ]`` (the README's) evaluates into
    a whole system, and sign.toml carries it as ``chain-hooks``, which the signer accepts."""
    readme = evaluated["readme"]
    assert readme["failed"] == [] and readme["toplevel"].endswith(".drv")
    assert 'chain-hooks = ["/etc/nix/upload-to-cache.sh"]' in readme["signToml"]
    assert readme["settings"]["sign"]["chain-hooks"] == ["/etc/nix/upload-to-cache.sh"]
    path = tmp_path / "sign.toml"
    path.write_text(readme["signToml"])
    sign_config.load(path, environ={})  # the signer accepts every key the module writes


def test_exclusive_leaves_nothing_around_the_gate(evaluated: dict[str, Any]) -> None:
    holes = evaluated["holes"]
    assert holes["failed"] == []
    conf = conf_settings(holes["nixConf"])
    assert conf["substituters"] == GATE_URL
    assert conf["trusted-public-keys"] == GATE_KEY
    for key in ("trusted-substituters", "extra-substituters", "extra-trusted-substituters",
                "extra-trusted-public-keys"):
        assert conf[key] == "", key
    assert "sneaky" not in holes["nixConf"] and OTHER_KEY not in holes["nixConf"]


def test_exclusive_names_what_it_drops(evaluated: dict[str, Any]) -> None:
    text = messages(evaluated["holes"])
    config_file = "holes.nix"
    for setting, value in (
        ("substituters", "https://mine.example.org"),
        ("extra-substituters", "https://sneaky.example.org"),
        ("trusted-substituters", "https://trusted.example.org"),
        ("extra-trusted-substituters", "https://extra-trusted.example.org"),
        ("trusted-public-keys", OTHER_KEY),
        ("extra-trusted-public-keys", OTHER_KEY),
    ):
        assert f'drops nix.settings.{setting} = [ "{value}" ] defined in' in text, setting
    assert text.count(config_file) >= 6
    assert "cache.nixos.org" not in text, "NixOS's own defaults are dropped without a word"
    assert "nix.settings.trusted-users lets @wheel pass their own substituters" in text
    assert "`!include /etc/nix/access-tokens.conf`" in text


def test_exclusive_false_keeps_other_substituters(evaluated: dict[str, Any]) -> None:
    conf = conf_settings(evaluated["shared"]["nixConf"])
    assert conf["substituters"].split() == [GATE_URL, "https://cache.nixos.org/"]
    assert conf["extra-substituters"] == "https://sneaky.example.org"
    assert evaluated["shared"]["warnings"] == []


POLICY = "services.tracehook.gate.policy"
REQUIRE = f"{POLICY}.trust.require"


@pytest.mark.parametrize(("scenario", "expected"), [
    ("mistakes", "services.tracehook.gate.signingPublicKey is set without "
                 "services.tracehook.gate.secretKeyFile"),
    ("mistakes", f"services.tracehook.sign.secretKeyFile = {STORE_SECRET} is in the Nix store"),
    ("mistakes", "services.tracehook.sign.environmentFile = "),
    ("mistakes", "publish.env is a Nix path literal"),
    ("mistakes", "nix.extraOptions (defined in"),
    ("mistakes", "sets `extra-substituters = https://sneaky.example.org`; "
                 "`trusted-public-keys = x:y`"),
    ("mistakes", "services.tracehook.sign: nix.settings.post-build-hook is also set in "),
    ("mistakes", "mistakes.nix (/etc/nix/upload-to-cache.sh): Nix runs a single post-build "
                 "hook, and the signer is it. Move that hook to "
                 "services.tracehook.sign.chainHooks"),
    ("mistakes", "services.tracehook.sign: nix.extraOptions sets `post-build-hook = "
                 "/etc/nix/other-hook.sh`, which would replace the signer's hook"),
    ("mistakes", "services.tracehook.gate.exclusive: nix.settings.substituters ends up as [ "),
    ("mistakes", '"https://forced.example.org"'),
    ("mistakes", "nix.settings.require-sigs = false lets every local user add unsigned store "
                 "paths"),
    ("mistakes", "nix.settings.binary-caches (Nix's old name of substituters) is set"),
    ("mistakes", f"{REQUIRE}.any-of[0].threshold = 3 is out of range: with 2 entries in `of` "
                 "it must be 1 to 2"),
    ("mistakes", f'{REQUIRE}.any-of[1].all-of[1] names key "ghost", which keys does not '
                 "define, nor evidence (defined: a, b)"),
    ("mistakes", f'{REQUIRE}.any-of[1]: key "a" appears in two entries of a threshold of 3'),
    ("mistakes", f"{REQUIRE}.any-of[2].all-of[1]: a narinfo-key is allowed only as the whole "
                 "trust.require"),
    ("mistakes", f"{REQUIRE}.any-of[3] must be a key name or a set with exactly one of"),
    ("mistakes", f"{REQUIRE}.any-of[4]: `any-of` takes no threshold"),
    ("mistakes", f"{POLICY}.keys.b: the same public key is already used by keys.a"),
    ("mistakes", f"{POLICY}.traces is empty"),
    ("mistakes", f'{POLICY}: "a" is both in keys and in evidence'),
    ("mistakes", f"{POLICY}.evidence.a: no allowed root; list roots (default: amd-milan, "
                 "amd-genoa, amd-turin) or root-files"),
    ("more-mistakes", "services.tracehook.gate.secretKeyFile = /nix/store/"),
    ("more-mistakes", "services.tracehook.gate.secretKeyFile is set without "
                      "services.tracehook.gate.signingPublicKey"),
    ("more-mistakes", "services.tracehook.sign is enabled without a key"),
])
def test_assertion_names_the_option(evaluated: dict[str, Any], scenario: str,
                                    expected: str) -> None:
    assert expected in " ".join(" ".join(evaluated[scenario]["failed"]).split())


def test_renamed_options_still_work(evaluated: dict[str, Any]) -> None:
    renamed = evaluated["renamed"]
    assert renamed["failed"] == []
    text = messages(renamed)
    assert "services.tracehook.gate.signingKeyFile" in text and "has been renamed" in text
    service = unit_sections(renamed["units"]["gate"])["Service"]
    assert service["LoadCredential"] == ["signing-key:/var/lib/secrets/old-name.sec"]


@pytest.fixture(scope="module")
def type_errors(tree: Path, nixos_env: NixEnv) -> dict[str, str]:
    """Each type error in its own evaluation of the toplevel (two at a time)."""
    paths = write_configurations(nixos_env.base / "type-errors",
                                 {name: text for name, (text, _) in TYPE_ERRORS.items()})

    def run(name: str) -> tuple[str, str]:
        expr = (f"let h = {harness(tree)}; in "
                f"(h.eval [ {paths[name]} ]).config.system.build.toplevel.drvPath")
        return name, evaluation_error(nixos_env, expr)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, TYPE_ERRORS))


@pytest.mark.parametrize("scenario", sorted(TYPE_ERRORS))
def test_type_error_names_the_option(type_errors: dict[str, str], scenario: str) -> None:
    assert TYPE_ERRORS[scenario][1] in type_errors[scenario]


# ------------------------------------------------------------------ units, nix.conf, package


def exposure(analyze: str, unit: Path) -> float:
    res = subprocess.run([analyze, "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, timeout=120, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    assert m, res.stdout[-2000:] + res.stderr
    return float(m.group(1))


def test_units_exposure(evaluated: dict[str, Any], tmp_path: Path) -> None:
    """``systemd-analyze security --offline=yes``: publisher <= 2.0, gate <= 1.3."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian: apt-get install systemd)")
    for name, limit in (("publish", 2.0), ("gate", 1.3)):
        unit = tmp_path / f"tracehook-{name}.service"
        unit.write_text(evaluated["readme"]["units"][name])
        score = exposure(analyze, unit)
        print(f"tracehook-{name}.service exposure {score}")
        assert score <= limit, f"tracehook-{name}.service: exposure {score} > {limit}"


def test_nix_reads_the_rendered_nix_conf(evaluated: dict[str, Any], nixos_env: NixEnv,
                                         tmp_path: Path) -> None:
    """Real Nix 2.26, given the rendered nix.conf, substitutes from the gate alone."""
    for name in ("readme", "holes"):
        conf_dir = tmp_path / name
        conf_dir.mkdir()
        (conf_dir / "nix.conf").write_text(evaluated[name]["nixConf"])
        res = nixos_env.run("nix", "--extra-experimental-features", "nix-command", "config",
                            "show", extra_env={"NIX_CONF_DIR": str(conf_dir),
                                               "NIX_USER_CONF_FILES": ""})
        assert "unknown setting" not in res.stderr, res.stderr
        shown = conf_settings(res.stdout)
        assert shown["substituters"] == GATE_URL, name
        assert shown["trusted-public-keys"] == GATE_KEY, name
        assert shown["trusted-substituters"] == "", name


def test_package_builds_from_tracked_sources(evaluated: dict[str, Any], tree: Path,
                                             nixos_env: NixEnv) -> None:
    package = evaluated["package"]
    assert package["name"] == "tracehook-0.1.0" or package["name"].startswith("tracehook-")
    assert package["wrapper"] == f"--suffix PATH : {package['nix']}/bin"
    src = evaluate(nixos_env, f"toString ({harness(tree)}).package.src", read_write=True)
    copied = nixos_env.root / src.lstrip("/")
    files = {str(p.relative_to(copied)) for p in copied.rglob("*") if p.is_file()}
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "src", "pyproject.toml",
                              "README.md"], capture_output=True, text=True, check=True,
                             timeout=60).stdout.split()
    assert files == set(tracked)
    assert not any(".egg-info" in f or "__pycache__" in f for f in files)


def test_vm_test_instantiates(tree: Path, nixos_env: NixEnv) -> None:
    """nix/tests/vm.nix with the tree's packages: three machines and the test driver."""
    out = evaluate(nixos_env, f"""
      let
        pkgs = import {tree} {{ system = "x86_64-linux"; }};
        test = import {REPO}/nix/tests/vm.nix {{ inherit pkgs; }};
      in {{
        driver = test.driver.drvPath;
        warnings = builtins.mapAttrs (_: node: node.warnings) test.nodes;
      }}""")
    assert out["driver"].endswith("-nixos-test-driver-tracehook.drv")
    assert out["warnings"] == {"builder": [], "cache": [], "consumer": []}


def test_flake_checks_instantiate(tree: Path, nixos_env: NixEnv) -> None:
    """flake.nix with the tree standing in for its nixpkgs input: the package, the module's
    scenario table (with real packages) and the example configuration's rendered files."""
    out = evaluate(nixos_env, f"""
      let
        lib = (import {tree}/lib).extend (final: _: {{
          nixosSystem = args: import {tree}/nixos/lib/eval-config.nix (
            {{ lib = final; system = null; }} // args);
        }});
        nixpkgs = {{
          inherit lib;
          legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ]
            (system: import {tree} {{ inherit system; }});
        }};
        flake = import {REPO}/flake.nix;
        self = flake.outputs {{ inherit self nixpkgs; }};
        checks = self.checks.x86_64-linux;
      in {{
        package = self.packages.x86_64-linux.default.drvPath;
        module-eval = checks.module-eval.drvPath;
        nixos-example = checks.nixos-example.drvPath;
        example-files = builtins.mapAttrs (_: toString) checks.nixos-example.entries;
      }}""")
    assert re.search(r"-tracehook-[0-9.]+\.drv$", out["package"])
    assert out["module-eval"].endswith("-tracehook-module-eval.drv")
    assert out["nixos-example"].endswith("-tracehook-nixos-example.drv")
    assert sorted(out["example-files"]) == [
        "nix.conf", "policy.toml", "sign.toml", "tracehook-gate.service",
        "tracehook-publish.service"]
    assert out["example-files"]["policy.toml"].endswith("-tracehook-policy.toml")


def test_rendered_hook_signs_then_runs_the_chained_hook(evaluated: dict[str, Any],
                                                        tmp_path: Path) -> None:
    """The README system's hook wrapper and sign.toml, with only their site paths moved
    under a temp dir, as real Nix 2.26's post-build-hook: every step is signed, and the
    chained hook (``/etc/nix/upload-to-cache.sh`` in the README) runs after the signing,
    with the environment Nix gave the hook."""
    from tracehook.trace import crypto

    readme = evaluated["readme"]
    env = NixEnv(get_tier("2.26"), tmp_path / "nix")
    site = tmp_path / "site"
    site.mkdir()
    sk = crypto.generate_secret_key("builder.example.org-1")
    crypto.write_key_files(sk, site / "builder.sec", site / "builder.pub")
    spool = site / "spool"
    chained = site / "upload-to-cache.sh"
    record = site / "chained.log"
    # The chained hook sees the step already signed: its trace is in the spool.
    chained.write_text("#!/bin/sh\n"
                       f'n=$(grep -l "$DRV_PATH" {spool}/pending/*.json 2>/dev/null | wc -l)\n'
                       f'echo "$DRV_PATH $n ${{OUT_PATHS:+outs}}" >> {record}\n')
    chained.chmod(0o755)
    moves = {
        "/etc/nix/builder.sec": str(site / "builder.sec"),
        "/var/lib/tracehook/spool": str(spool),
        "/var/log/tracehook/sign.log": str(site / "sign.log"),
        "/var/lib/tracehook/traces": str(site / "traces"),
        "/etc/nix/upload-to-cache.sh": str(chained),
        "/run/tracehook/agent.sock": str(site / "run" / "agent.sock"),  # no agent: in process
        'agent-user = "tracehook"': 'agent-user = "root"',
    }
    sign_toml = readme["signToml"]
    for old, new in moves.items():
        assert old in sign_toml, old
        sign_toml = sign_toml.replace(old, new)
    (site / "sign.toml").write_text(sign_toml)
    hook = readme["hook"]
    first, _, body = hook.partition("\n")
    assert first.startswith("#!/nix/store/") and first.endswith("/bin/bash")
    venv_bin = Path(sys.executable).parent
    body = (body.replace("/etc/tracehook/sign.toml", str(site / "sign.toml"))
            .replace(f"{readme['package']}/bin/", f"{venv_bin}/"))
    wrapper = site / "post-build-hook"
    wrapper.write_text("#!/bin/bash\n" + body)
    wrapper.chmod(0o755)
    env.configure(post_build_hook=str(wrapper))
    built = env.build("iaB", salt="nixos-chain")
    assert built.out_paths
    lines = record.read_text().splitlines()
    assert len(lines) == 2, lines  # ia-a and ia-b, each once
    for line in lines:
        drv, count, outs = line.split()
        assert drv.endswith(".drv") and int(count) >= 1 and outs == "outs", line
    events = [json.loads(x) for x in (site / "sign.log").read_text().splitlines()]
    assert sum(1 for e in events if e.get("event") == "sign" and e.get("outcome") == "ok") == 2


def test_readme_configuration_with_nix_2_8(evaluated: dict[str, Any], tree: Path,
                                           tmp_path: Path) -> None:
    """The old tier (Nix 2.8, Debian 12's) evaluates the README system too, rendering the
    very same files as Nix 2.26."""
    env = NixEnv(get_tier("2.8"), tmp_path / "nix28")
    path = write_configurations(tmp_path / "configs", {"readme": WORKING["readme"][0]})["readme"]
    out = evaluate(env, f"""
      let h = {harness(tree)}; e = h.eval [ {path} ]; f = h.facts e; in
      {{ inherit (f) failed warnings nixConf signToml policyToml hook units package;
         inherit (h.whole e) toplevel; }}""")
    readme = evaluated["readme"]
    assert out["failed"] == [] and out["warnings"] == []
    assert out["toplevel"].endswith(".drv")
    for key in ("nixConf", "signToml", "policyToml", "hook", "units", "package"):
        assert out[key] == readme[key], key
