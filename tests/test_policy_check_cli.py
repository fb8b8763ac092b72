"""``tracehook policy check FILE``: the one-line verdict the NixOS module relies on.

The module runs it on the rendered policy at build time, as the gate's ``ExecStartPre`` and
before ``ExecReload`` signals the gate: exit 0 and a summary for a policy that loads, exit 2
and the loader's one-line error for one that does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nixharness import REPO
from tracehook import cli
from tracehook.errors import EXIT_OK, EXIT_USAGE

EXAMPLES = REPO / "examples"
BUILDER = "builder.example.org-1:diZIhvLSthXHFH+qz5dY/Fegz/u7Z+8aMekjrabc+fI="
CACHE = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["policy", "check", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("name", "summary"), [
    ("policy-my-builder.toml", "valid: 1 key, 1 trace store; requires mine"),
    ("policy-2-of-3-rebuilders.toml",
     "valid: 3 keys, 3 trace stores; requires 2 of (rebuilderA, rebuilderB, rebuilderC)"),
    ("policy-me-and-a-cache.toml",
     "valid: 4 keys (1 revoked), 3 trace stores; requires all of (mine, any of (cacheX, "
     "cacheY))"),
    ("policy-cache-or-my-builder.toml",
     "valid: 1 key, 1 cache key, 1 trace store; requires any of (mine, cache signature by "
     "cache.nixos.org-1)"),
])
def test_valid_policy_one_line(name: str, summary: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(EXAMPLES / name, capsys)
    assert code == EXIT_OK
    assert out == f"{EXAMPLES / name}: {summary}\n"
    assert err == ""


def test_expired_key_is_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(f'traces = ["file:///t"]\n[keys]\nold = {{ key = "{BUILDER}", '
                      f"not-after = 2001-01-01T00:00:00Z }}\n[trust]\nrequire = \"old\"\n")
    code, out, _ = check(policy, capsys)
    assert code == EXIT_OK
    assert out.endswith(": valid: 1 key (1 expired), 1 trace store; requires old\n")


@pytest.mark.parametrize(("text", "error"), [
    (f'[keys]\nmine = "{BUILDER}"\n[trust]\nrequre = "mine"\n',
     "[trust] has unknown entry 'requre' (did you mean 'require'?)"),
    (f'[keys]\nmine = "{BUILDER}"\n[trust]\nrequire = {{ threshold = 2, of = ["mine"] }}\n',
     "threshold 2 is out of range; with 1 entries in 'of' it must be 1 to 1"),
    ('[keys]\nmine = ":abc"\n[trust]\nrequire = "mine"\n', "[keys] mine: malformed public key"),
    (f'[keys]\nmine = {{ key = "{BUILDER}", not-after = "2027-01-01" }}\n[trust]\n'
     'require = "mine"\n', "not-after must be a TOML date or date-time"),
    (f'[keys]\na = "{BUILDER}"\n[trust]\n'
     f'require = {{ all-of = ["a", {{ narinfo-key = "{CACHE}" }}] }}\n',
     "a narinfo-key is allowed only as the whole [trust] require"),
    ("not toml = = \n", "not valid TOML"),
])
def test_invalid_policy_exit_2_one_line(tmp_path: Path, text: str, error: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(text)
    code, out, err = check(policy, capsys)
    assert code == EXIT_USAGE
    assert out == ""
    assert err.startswith(f"tracehook: error: {policy}: ")
    assert error in err
    assert err.count("\n") == 1, "one line"


def test_missing_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(tmp_path / "absent.toml", capsys)
    assert code == EXIT_USAGE
    assert out == ""
    assert err == f"tracehook: error: policy file {tmp_path / 'absent.toml'} does not exist\n"


def test_policy_needs_an_action(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy"]) == EXIT_USAGE
    assert "ACTION" in capsys.readouterr().err
