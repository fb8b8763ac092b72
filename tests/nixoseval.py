"""Real NixOS evaluations of the module, for test_nixos_eval.py and test_nixos_whole.py.

The configurations (each a NixOS module text, written to a temp directory so warnings can
name their file), the one batch evaluation that renders them all
(``nix/tests/nixos-eval.nix``), the evaluations that must fail with a type error, the other
evaluations that need nixpkgs (the VM test, the flake's checks, eval-module.nix), and small
readers for what they render (nix.conf, unit files). tests/conftest.py turns these into
session fixtures (``nixos_tree``, ``nixos_env``, ``nixos_facts``, ``nixos_type_errors``), so the
batch runs once per session.

The nixpkgs tree: ``NIXPKGS_TREE=DIR`` when set (a whole tree; on the project's machines the
shared ``nixos-eval/setup.sh`` beside the clone prepares one), else the subset of that tree
these evaluations read, vendored in tests/data/nixos-24.05-subset/ (its README says where it
comes from and how ``scripts/nixos-subset.sh`` regenerates it), extracted once per session.
So the tests always run; nothing outside the clone is read.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nixharness import REPO, NixEnv

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


SUBSET = REPO / "tests" / "data" / "nixos-24.05-subset"
SUBSET_TARBALL = SUBSET / "tree.tar.xz"


def is_tree(path: Path) -> bool:
    return (path / "nixos" / "lib" / "eval-config.nix").is_file() and \
        (path / "lib" / "default.nix").is_file()


def given_tree() -> Path | None:
    """``$NIXPKGS_TREE`` (resolved), None when unset; set to anything but a nixpkgs tree is
    a mistake, not a reason to evaluate something else."""
    value = os.environ.get(TREE_ENV, "")
    if not value:
        return None
    if not is_tree(Path(value)):
        raise RuntimeError(f"{TREE_ENV}={value} is not a nixpkgs tree (no nixos/lib/"
                           "eval-config.nix or lib/default.nix): unset it to use the vendored "
                           f"subset ({SUBSET.relative_to(REPO)})")
    return Path(value).resolve()


def extract_subset(dest: Path, tarball: Path = SUBSET_TARBALL) -> Path:
    """The vendored subset of the NixOS 24.05 tree, extracted into ``dest`` (which must not
    exist yet); returns the tree's root."""
    dest.mkdir(parents=True)
    with tarfile.open(tarball, "r:xz") as archive:
        data_filter = getattr(tarfile, "data_filter", None)
        if data_filter is not None:  # Python 3.10.12 and later
            archive.extractall(dest, filter=data_filter)
        else:  # pragma: no cover - older Python 3.10
            archive.extractall(dest)  # our own tarball
    root = dest / "tree"
    if not is_tree(root):
        raise RuntimeError(f"{tarball} does not hold a nixpkgs tree under tree/")
    return root


def nixpkgs_tree(scratch: Path) -> Path:
    """``$NIXPKGS_TREE``, else the vendored subset extracted under ``scratch``."""
    return given_tree() or extract_subset(scratch / "subset")


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


def vm_test_facts(tree: Path, env: NixEnv) -> Any:
    """nix/tests/vm.nix with the tree's packages: the test driver, the machines' warnings,
    the SeaweedFS it runs."""
    return evaluate(env, f"""
      let
        pkgs = import {tree} {{ system = "x86_64-linux"; }};
        test = import {REPO}/nix/tests/vm.nix {{ inherit pkgs; }};
        weed = builtins.head (builtins.filter (p: (p.pname or p.name) == "seaweedfs-4.48")
          test.nodes.cache.environment.systemPackages);
      in {{
        driver = test.driver.drvPath;
        warnings = builtins.mapAttrs (_: node: node.warnings) test.nodes;
        weed = weed.drvPath;
      }}""")


def flake_check_facts(tree: Path, env: NixEnv) -> Any:
    """flake.nix with the tree standing in for its nixpkgs input: its package and checks."""
    return evaluate(env, f"""
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


def module_scenarios(tree: Path, env: NixEnv) -> Any:
    """nix/tests/eval-module.nix under the tree's ``lib.evalModules``: every scenario."""
    return evaluate(env, f"import {REPO}/nix/tests/eval-module.nix "
                         f"{{ lib = import {tree}/lib; }}", read_write=True)


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


S3_TRACES = ("s3://traces/fleet-a?endpoint=s3.example.org:8333&scheme=http&region=eu-1"
             "&single-writer=0")
S3_CACHE = "s3://nix-cache?endpoint=s3.example.org:8333&scheme=http"
STORE_AWS = "/nix/store/00000000000000000000000000000000-publish.aws"


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
    # S3 trace stores and an S3 cache, with credentials files for both services.
    "s3": (f"""{{ ... }}: {{
      services.tracehook.sign = {{
        enable = true;
        secretKeyFile = "/etc/nix/builder.sec";
        publishTo = [ "{S3_TRACES}" ];
        s3CredentialsFile = "/var/lib/secrets/publish.aws";
      }};
      services.tracehook.gate = {{
        enable = true;
        upstreams = [ "{S3_CACHE}" ];
        policy = {{
          traces = [ "{S3_TRACES.replace("&single-writer=0", "")}" ];
          keys.mine = "{BUILDER_KEY}";
          trust.require = "mine";
        }};
        secretKeyFile = "/var/lib/secrets/gate.sec";
        signingPublicKey = "{GATE_KEY}";
        s3CredentialsFile = "/var/lib/secrets/gate.aws";
      }};
    }}""", False),
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
        s3CredentialsFile = "{STORE_AWS}";
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
        s3CredentialsFile = ./gate.aws;
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
    "s3-upstream-single-writer": (
        gate_with('services.tracehook.gate.upstreams = lib.mkForce '
                  f'[ "{S3_CACHE}&single-writer=1" ];'),
        "A definition for option `services.tracehook.gate.upstreams",
    ),
    "gate-public-key-typo": (
        gate_with('services.tracehook.gate.signingPublicKey = lib.mkForce "gate-1:abc";'),
        "A definition for option `services.tracehook.gate.signingPublicKey' is not of type",
    ),
}


def write_configurations(directory: Path, configs: dict[str, str]) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "publish.env").write_text("")
    (directory / "gate.aws").write_text("")
    shutil.copy2(REPO / "examples" / "policy-my-builder.toml", directory / "policy.toml")
    paths = {}
    for name, text in configs.items():
        path = directory / f"{name}.nix"
        path.write_text(text)
        paths[name] = path
    return paths


def evaluate_all(tree: Path, nixos_env: NixEnv) -> dict[str, Any]:
    """Every working and every assertion-failing configuration and every example policy, in
    one evaluation."""
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


def evaluate_type_errors(tree: Path, nixos_env: NixEnv) -> dict[str, str]:
    """Each type error in its own evaluation of the toplevel (two at a time)."""
    paths = write_configurations(nixos_env.base / "type-errors",
                                 {name: text for name, (text, _) in TYPE_ERRORS.items()})

    def run(name: str) -> tuple[str, str]:
        expr = (f"let h = {harness(tree)}; in "
                f"(h.eval [ {paths[name]} ]).config.system.build.toplevel.drvPath")
        return name, evaluation_error(nixos_env, expr)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, TYPE_ERRORS))
