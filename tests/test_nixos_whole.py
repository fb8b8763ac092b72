"""The NixOS module's rendering put to work (issue 16): units scored by systemd, nix.conf
read by real Nix, tmpfiles rules applied, the rendered hook and sign.toml run by real Nix as
its post-build-hook, the package's source, the VM test and the flake's checks instantiated,
and Nix 2.8 rendering the README system as Nix 2.26 does.

Evaluates against ``NIXPKGS_TREE`` when set, else against the vendored subset of a NixOS
24.05 tree (see tests/nixoseval.py): every test here runs on any machine.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from nixharness import REPO, NixEnv, get_tier
from nixoseval import (
    GATE_KEY,
    GATE_URL,
    WORKING,
    conf_settings,
    evaluate,
    flake_check_facts,
    harness,
    vm_test_facts,
    write_configurations,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

pytestmark = pytest.mark.nix


def test_state_directories(nixos_facts: dict[str, Any], tmp_path: Path) -> None:
    rules = nixos_facts["readme"]["tmpfiles"]
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


# ------------------------------------------------------------------ units, nix.conf, package


def exposure(analyze: str, unit: Path) -> float:
    res = subprocess.run([analyze, "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, timeout=120, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    assert m, res.stdout[-2000:] + res.stderr
    return float(m.group(1))


def test_units_exposure(nixos_facts: dict[str, Any], tmp_path: Path) -> None:
    """``systemd-analyze security --offline=yes``: publisher <= 2.0, gate <= 1.3."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian: apt-get install systemd)")
    for name, limit in (("publish", 2.0), ("gate", 1.3)):
        unit = tmp_path / f"tracehook-{name}.service"
        unit.write_text(nixos_facts["readme"]["units"][name])
        score = exposure(analyze, unit)
        print(f"tracehook-{name}.service exposure {score}")
        assert score <= limit, f"tracehook-{name}.service: exposure {score} > {limit}"


def test_nix_reads_the_rendered_nix_conf(nixos_facts: dict[str, Any], nixos_env: NixEnv,
                                         tmp_path: Path) -> None:
    """Real Nix 2.26, given the rendered nix.conf, substitutes from the gate alone."""
    for name in ("readme", "holes"):
        conf_dir = tmp_path / name
        conf_dir.mkdir()
        (conf_dir / "nix.conf").write_text(nixos_facts[name]["nixConf"])
        res = nixos_env.run("nix", "--extra-experimental-features", "nix-command", "config",
                            "show", extra_env={"NIX_CONF_DIR": str(conf_dir),
                                               "NIX_USER_CONF_FILES": ""})
        assert "unknown setting" not in res.stderr, res.stderr
        shown = conf_settings(res.stdout)
        assert shown["substituters"] == GATE_URL, name
        assert shown["trusted-public-keys"] == GATE_KEY, name
        assert shown["trusted-substituters"] == "", name


def test_package_builds_from_tracked_sources(nixos_facts: dict[str, Any], nixos_tree: Path,
                                             nixos_env: NixEnv) -> None:
    package = nixos_facts["package"]
    assert package["name"] == "tracehook-0.1.0" or package["name"].startswith("tracehook-")
    assert package["wrapper"] == f"--suffix PATH : {package['nix']}/bin"
    src = evaluate(nixos_env, f"toString ({harness(nixos_tree)}).package.src", read_write=True)
    copied = nixos_env.root / src.lstrip("/")
    files = {str(p.relative_to(copied)) for p in copied.rglob("*") if p.is_file()}
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "src", "pyproject.toml",
                              "README.md"], capture_output=True, text=True, check=True,
                             timeout=60).stdout.split()
    assert files == set(tracked)
    assert not any(".egg-info" in f or "__pycache__" in f for f in files)


def test_package_has_the_dependencies_and_the_s3_extra(nixos_facts: dict[str, Any]) -> None:
    """The Nix package propagates pyproject.toml's dependencies (cryptography included, for
    hardware evidence) and its ``s3`` extra (botocore), so every URL the module accepts
    opens; a marker-only dependency (tomli, Python < 3.11) is left to its marker."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [r for r in project["dependencies"] + project["optional-dependencies"]["s3"]
              if ";" not in r]
    names = {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in wanted}
    assert {"cryptography", "botocore"} <= names
    assert sorted(nixos_facts["package"]["dependencies"]) == sorted(names)


def test_vm_test_instantiates(nixos_tree: Path, nixos_env: NixEnv) -> None:
    """nix/tests/vm.nix with the tree's packages: three machines and the test driver."""
    out = vm_test_facts(nixos_tree, nixos_env)
    assert out["driver"].endswith("-nixos-test-driver-tracehook.drv")
    assert out["warnings"] == {"builder": [], "cache": [], "consumer": []}
    assert out["weed"].endswith("-seaweedfs-4.48.drv")


def test_flake_checks_instantiate(nixos_tree: Path, nixos_env: NixEnv) -> None:
    """flake.nix with the tree standing in for its nixpkgs input: the package, the module's
    scenario table (with real packages) and the example configuration's rendered files."""
    out = flake_check_facts(nixos_tree, nixos_env)
    assert re.search(r"-tracehook-[0-9.]+\.drv$", out["package"])
    assert out["module-eval"].endswith("-tracehook-module-eval.drv")
    assert out["nixos-example"].endswith("-tracehook-nixos-example.drv")
    assert sorted(out["example-files"]) == [
        "nix.conf", "policy.toml", "sign.toml", "tracehook-gate.service",
        "tracehook-publish.service"]
    assert out["example-files"]["policy.toml"].endswith("-tracehook-policy.toml")


def test_rendered_hook_signs_then_runs_the_chained_hook(nixos_facts: dict[str, Any],
                                                        tmp_path: Path) -> None:
    """The README system's hook wrapper and sign.toml, with only their site paths moved
    under a temp dir, as real Nix 2.26's post-build-hook: every step is signed, and the
    chained hook (``/etc/nix/upload-to-cache.sh`` in the README) runs after the signing,
    with the environment Nix gave the hook."""
    from tracehook.trace import crypto

    readme = nixos_facts["readme"]
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


def test_readme_configuration_with_nix_2_8(nixos_facts: dict[str, Any], nixos_tree: Path,
                                           tmp_path: Path) -> None:
    """The old tier (Nix 2.8, Debian 12's) evaluates the README system too, rendering the
    very same files as Nix 2.26."""
    env = NixEnv(get_tier("2.8"), tmp_path / "nix28")
    path = write_configurations(tmp_path / "configs", {"readme": WORKING["readme"][0]})["readme"]
    out = evaluate(env, f"""
      let h = {harness(nixos_tree)}; e = h.eval [ {path} ]; f = h.facts e; in
      {{ inherit (f) failed warnings nixConf signToml policyToml hook units package;
         inherit (h.whole e) toplevel; }}""")
    readme = nixos_facts["readme"]
    assert out["failed"] == [] and out["warnings"] == []
    assert out["toplevel"].endswith(".drv")
    for key in ("nixConf", "signToml", "policyToml", "hook", "units", "package"):
        assert out[key] == readme[key], key
