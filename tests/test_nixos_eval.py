"""The NixOS module inside real NixOS evaluations (issue 16): what it renders.

Real Nix 2.26 evaluates, once per session (tests/nixoseval.py, ``nix/tests/nixos-eval.nix``),
every configuration that must work or must fail an assertion: the README's configuration
(toplevel instantiated, nix.conf, sign.toml, the policy, both units, the hook, the option
docs), the example configuration, Lix as ``nix.package``, the exclusive-mode holes, the
renamed options, S3 trace stores and caches with their credentials files (issue 15), every
assertion, and every example policy as an attribute set; and, one evaluation each, the type
errors (a policy typo, an unknown policy attribute, a nameless key, port 99999,
``require = 5``, a bad ``not-after``, an unknown trace-store scheme, ``single-writer`` on an
S3 cache, a bad gate public key). tests/test_nixos_whole.py runs what was rendered.

Evaluates against ``NIXPKGS_TREE`` when set, else against the vendored subset of a NixOS
24.05 tree (tests/data/nixos-24.05-subset): every test here runs on any machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from nixoseval import (
    EXAMPLE_POLICIES,
    GATE_KEY,
    GATE_URL,
    OTHER_KEY,
    S3_CACHE,
    S3_TRACES,
    STORE_AWS,
    STORE_SECRET,
    TYPE_ERRORS,
    conf_settings,
    messages,
    unit_sections,
)
from tracehook import cli
from tracehook.signer import config as sign_config
from tracehook.verify.policy import load_policy, parse_policy

pytestmark = pytest.mark.nix


# ------------------------------------------------------------------ the README configuration


def test_readme_configuration_instantiates(nixos_facts: dict[str, Any]) -> None:
    readme = nixos_facts["readme"]
    assert readme["failed"] == []
    assert readme["warnings"] == []
    assert readme["toplevel"].endswith(".drv") and "nixos-system" in readme["toplevel"]


def test_example_configuration_instantiates(nixos_facts: dict[str, Any]) -> None:
    example = nixos_facts["example"]
    assert example["failed"] == [] and example["warnings"] == []
    assert example["toplevel"].endswith(".drv")
    gate = unit_sections(example["units"]["gate"])["Service"]
    assert "IPAddressDeny" not in gate, "allowedIPs is commented out in the example"


def test_readme_nix_conf_has_only_the_gate(nixos_facts: dict[str, Any]) -> None:
    conf = conf_settings(nixos_facts["readme"]["nixConf"])
    assert conf["substituters"] == GATE_URL
    assert conf["trusted-public-keys"] == GATE_KEY
    for key in ("trusted-substituters", "extra-substituters", "extra-trusted-substituters",
                "extra-trusted-public-keys"):
        assert conf[key] == "", key
    assert conf["narinfo-cache-positive-ttl"] == conf["narinfo-cache-negative-ttl"] == "0"
    assert conf["post-build-hook"].startswith("/nix/store/")


def test_readme_policy_renders_and_loads(nixos_facts: dict[str, Any], tmp_path: Path) -> None:
    text = nixos_facts["readme"]["policyToml"]
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
def test_policy_examples_round_trip(nixos_facts: dict[str, Any], path: Path) -> None:
    """Every example policy, written as the module's attribute set, renders to a file the
    loader reads as the very same policy: the typed submodule mirrors the schema exactly."""
    rendered = nixos_facts["policies"][path.name]
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


def test_readme_sign_toml_loads(nixos_facts: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "sign.toml"
    path.write_text(nixos_facts["readme"]["signToml"])
    cfg = sign_config.load(path, environ={})
    assert cfg.secret_key_file == Path("/etc/nix/builder.sec")
    assert cfg.publish_to == ("file:///var/lib/tracehook/traces", "https://traces.example.org")
    assert cfg.spool_dir == Path("/var/lib/tracehook/spool")
    assert cfg.chain_hooks == ("/etc/nix/upload-to-cache.sh",)
    assert cfg.agent_socket == Path("/run/tracehook/agent.sock")
    assert cfg.nix_flavor is None and cfg.nix_version is None, "the signer detects them"
    text = nixos_facts["readme"]["signToml"]
    assert 'chain-hooks = ["/etc/nix/upload-to-cache.sh"]' in text
    assert 'agent-user = "tracehook"' in text


def test_gate_command_line_parses(nixos_facts: dict[str, Any]) -> None:
    start = nixos_facts["readme"]["gateStart"]
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
    service = unit_sections(nixos_facts["readme"]["units"]["gate"])["Service"]
    assert service["CacheDirectory"] == ["tracehook-gate"]
    assert service["LogsDirectory"] == ["tracehook-gate"]


def test_gate_unit_reloads_and_checks_the_policy(nixos_facts: dict[str, Any]) -> None:
    unit = unit_sections(nixos_facts["readme"]["units"]["gate"])
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


def test_publisher_unit_is_unprivileged(nixos_facts: dict[str, Any]) -> None:
    readme = nixos_facts["readme"]
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


def test_hook_runs_the_daemons_nix(nixos_facts: dict[str, Any]) -> None:
    for name in ("readme", "lix"):
        facts = nixos_facts[name]
        hook = facts["hook"]
        assert "export TRACEHOOK_CONFIG=/etc/tracehook/sign.toml" in hook
        assert f"export PATH={facts['nixPackage']}/bin${{PATH:+:$PATH}}" in hook
        assert f"exec {facts['package']}/bin/tracehook-post-build" in hook
        env = unit_sections(facts["units"]["publish"])["Service"]["Environment"]
        path = next(e for e in env if e.startswith('"PATH='))
        assert path.startswith(f'"PATH={facts["nixPackage"]}/bin:'), path
    assert "-lix-" in nixos_facts["lix"]["nixPackage"]


def test_option_docs_render(nixos_facts: dict[str, Any]) -> None:
    docs = {d["name"]: d for d in nixos_facts["readme"]["docs"]}
    assert "services.tracehook.package" in docs
    assert docs["services.tracehook.package"]["default"]["text"] == "pkgs.tracehook"
    for name, doc in docs.items():
        default = json.dumps(doc["default"])
        assert "/nix/store" not in default, f"{name}: a default computed from the system"


# ------------------------------------------------------------------ the items


def test_chain_hooks_reach_sign_toml(nixos_facts: dict[str, Any], tmp_path: Path) -> None:
    """``sign.chainHooks = [ "/etc/nix/upload-to-cache.sh" ]`` (the README's) evaluates into
    a whole system, and sign.toml carries it as ``chain-hooks``, which the signer accepts."""
    readme = nixos_facts["readme"]
    assert readme["failed"] == [] and readme["toplevel"].endswith(".drv")
    assert 'chain-hooks = ["/etc/nix/upload-to-cache.sh"]' in readme["signToml"]
    assert readme["settings"]["sign"]["chain-hooks"] == ["/etc/nix/upload-to-cache.sh"]
    path = tmp_path / "sign.toml"
    path.write_text(readme["signToml"])
    sign_config.load(path, environ={})  # the signer accepts every key the module writes


def test_exclusive_leaves_nothing_around_the_gate(nixos_facts: dict[str, Any]) -> None:
    holes = nixos_facts["holes"]
    assert holes["failed"] == []
    conf = conf_settings(holes["nixConf"])
    assert conf["substituters"] == GATE_URL
    assert conf["trusted-public-keys"] == GATE_KEY
    for key in ("trusted-substituters", "extra-substituters", "extra-trusted-substituters",
                "extra-trusted-public-keys"):
        assert conf[key] == "", key
    assert "sneaky" not in holes["nixConf"] and OTHER_KEY not in holes["nixConf"]


def test_exclusive_names_what_it_drops(nixos_facts: dict[str, Any]) -> None:
    text = messages(nixos_facts["holes"])
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


def test_exclusive_false_keeps_other_substituters(nixos_facts: dict[str, Any]) -> None:
    conf = conf_settings(nixos_facts["shared"]["nixConf"])
    assert conf["substituters"].split() == [GATE_URL, "https://cache.nixos.org/"]
    assert conf["extra-substituters"] == "https://sneaky.example.org"
    assert nixos_facts["shared"]["warnings"] == []


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
    ("mistakes", f"services.tracehook.sign.s3CredentialsFile = {STORE_AWS} is in the Nix "
                 "store"),
    ("more-mistakes", "services.tracehook.gate.secretKeyFile = /nix/store/"),
    ("more-mistakes", "services.tracehook.gate.s3CredentialsFile = "),
    ("more-mistakes", "gate.aws is a Nix path literal"),
    ("more-mistakes", "services.tracehook.gate.secretKeyFile is set without "
                      "services.tracehook.gate.signingPublicKey"),
    ("more-mistakes", "services.tracehook.sign is enabled without a key"),
])
def test_assertion_names_the_option(nixos_facts: dict[str, Any], scenario: str,
                                    expected: str) -> None:
    assert expected in " ".join(" ".join(nixos_facts[scenario]["failed"]).split())


# ------------------------------------------------------------------ S3 stores and credentials


def credentials(service: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """The unit's credentials and the AWS variables of its environment."""
    env = [e for e in service.get("Environment", []) if e.startswith('"AWS_')]
    return service.get("LoadCredential", []), env


def test_s3_urls_reach_sign_toml_and_the_gate(nixos_facts: dict[str, Any],
                                              tmp_path: Path) -> None:
    s3 = nixos_facts["s3"]
    assert s3["failed"] == [] and s3["warnings"] == []
    path = tmp_path / "sign.toml"
    path.write_text(s3["signToml"])
    assert sign_config.load(path, environ={}).publish_to == (S3_TRACES,)
    line = s3["gateStart"].strip().splitlines()[-1]
    argv = [a or b for a, b in re.findall(r"'([^']*)'|(\S+)", line)]
    args = cli.build_parser(argv[2:]).parse_args(argv[2:])
    assert args.upstream == [S3_CACHE]
    policy = tmp_path / "policy.toml"
    policy.write_text(s3["policyToml"])
    assert load_policy(policy).traces == (
        "s3://traces/fleet-a?endpoint=s3.example.org:8333&scheme=http&region=eu-1",)


def test_s3_credentials_are_systemd_credentials(nixos_facts: dict[str, Any]) -> None:
    """``s3CredentialsFile``: the file is a credential (``aws``), and botocore's lookup is
    pointed at it (``%d`` is the unit's credentials directory); nothing without it."""
    for unit, key, file in (("publish", "secret-key:/etc/nix/builder.sec",
                             "/var/lib/secrets/publish.aws"),
                            ("gate", "signing-key:/var/lib/secrets/gate.sec",
                             "/var/lib/secrets/gate.aws")):
        service = unit_sections(nixos_facts["s3"]["units"][unit])["Service"]
        assert credentials(service) == ([key, f"aws:{file}"],
                                        ['"AWS_SHARED_CREDENTIALS_FILE=%d/aws"']), unit
        readme = unit_sections(nixos_facts["readme"]["units"][unit])["Service"]
        assert credentials(readme) == ([key], []), unit


@pytest.mark.parametrize("unit", ["publish", "gate"])
def test_s3_credentials_reach_the_store(nixos_facts: dict[str, Any], unit: str,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the rendered unit gives the service (its credentials directory as systemd lays it
    out, its environment with ``%d`` expanded) is where the S3 store finds its keys."""
    from tracehook.stores.s3 import S3Location, load_credentials

    service = unit_sections(nixos_facts["s3"]["units"][unit])["Service"]
    creds_dir = tmp_path / "credentials"
    creds_dir.mkdir()
    for entry in service["LoadCredential"]:
        name, _, source = entry.partition(":")
        assert source.startswith("/var/lib/secrets/") or source == "/etc/nix/builder.sec"
        (creds_dir / name).write_text(
            "[default]\naws_access_key_id = AKIDEXAMPLE\n"
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY\n"
            if name == "aws" else "")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    for entry in service["Environment"]:
        name, _, value = entry.strip('"').partition("=")
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value.replace("%d", str(creds_dir)))
    url = S3_TRACES if unit == "publish" else S3_CACHE
    creds = load_credentials(S3Location.parse(url, "test"), "test")
    assert creds is not None and creds.access_key == "AKIDEXAMPLE"
    assert creds.method == "shared-credentials-file"


def test_renamed_options_still_work(nixos_facts: dict[str, Any]) -> None:
    renamed = nixos_facts["renamed"]
    assert renamed["failed"] == []
    text = messages(renamed)
    assert "services.tracehook.gate.signingKeyFile" in text and "has been renamed" in text
    service = unit_sections(renamed["units"]["gate"])["Service"]
    assert service["LoadCredential"] == ["signing-key:/var/lib/secrets/old-name.sec"]


@pytest.mark.parametrize("scenario", sorted(TYPE_ERRORS))
def test_type_error_names_the_option(nixos_type_errors: dict[str, str], scenario: str) -> None:
    assert TYPE_ERRORS[scenario][1] in nixos_type_errors[scenario]
