"""``tracehook verify``: exit codes, malformed input, the store that cannot be read."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from testkeys import CONFORMANCE
from verifyhelp import run_verify, write_policy

BINUTILS = "/nix/store/6a4wpppqvmf5dwr49gfm3hrxhd58hg0w-bootstrap-stage0-binutils-wrapper-.drv"
TOOLS = "/nix/store/w14fhgwzx0421c2ry4d9hx1cpsfsjlf5-bootstrap-tools.drv"
BOTH = '{ all-of = ["builderA", "builderB"] }'


def _args(policy: Path, store: str, *extra: str) -> list[str]:
    return [BINUTILS, "--policy", str(policy), "--store", store,
            "--traces", f"file://{CONFORMANCE}", *extra]


def _store_with_tools(tmp_path: Path, edit: Callable[[str], str]) -> Path:
    """A copy of the conformance store with bootstrap-tools.drv (deep in the graph) edited."""
    root = tmp_path / "root"
    shutil.copytree(CONFORMANCE / "store", root)
    bad = root / TOOLS.lstrip("/")
    bad.chmod(0o644)
    bad.write_text(edit(bad.read_text()))
    return root


def test_malformed_drv_deep_in_the_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    root = _store_with_tools(tmp_path, lambda _: 'Derive([("out","","r:sha256","")],[garbage')
    res = run_verify(capsys, *_args(write_policy(tmp_path / "p.toml", BOTH), str(root)))
    assert res.rc == 1
    assert "malformed derivation" in res.out and "bootstrap-tools.drv" in res.out


def test_drv_that_does_not_hash_to_its_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    root = _store_with_tools(
        tmp_path, lambda text: text.replace("bootstrap-tools", "bootstrap-tooLs", 1))
    res = run_verify(capsys, *_args(write_policy(tmp_path / "p.toml", BOTH), str(root)))
    assert res.rc == 1
    assert "not to its path" in res.out


@pytest.mark.parametrize(("name", "args", "rc", "text"), [
    ("bad-policy", ["--policy", "{policy_bad}"], 2, "threshold 5 is out of range"),
    ("no-such-policy", ["--policy", "/nonexistent.toml"], 2, "does not exist"),
    ("not-a-store-path", ["--policy", "{policy}", "--target", "/tmp/x"], 2, "not a store path"),
    ("store-unreadable", ["--policy", "{policy}", "--store", "{missing}"], 3,
     "cannot read derivation"),
    ("trace-store-url", ["--policy", "{policy}", "--traces", "ftp://x"], 2, "use file:///DIR"),
    ("no-trace-store", ["--policy", "{policy}", "--no-traces"], 2, "no trace stores"),
    ("negative-processes", ["--policy", "{policy}", "--processes", "-1"], 2, "give 0 or more"),
])
def test_exit_codes(name: str, args: list[str], rc: int, text: str, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    values = {
        "policy": str(write_policy(tmp_path / "p.toml", BOTH)),
        "policy_bad": str(write_policy(tmp_path / "b.toml",
                                       '{ threshold = 5, of = ["builderA"] }')),
        "missing": str(tmp_path / "missing"),
    }
    args = [a.format(**values) for a in args]
    target = BINUTILS
    if "--target" in args:
        target = args[args.index("--target") + 1]
        args = args[:args.index("--target")]
    traces = [] if "--no-traces" in args else ["--traces", f"file://{CONFORMANCE}"]
    args = [a for a in args if a != "--no-traces"]
    if "--traces" in args:
        traces = []
    store = [] if "--store" in args else ["--store", str(CONFORMANCE / "store")]
    res = run_verify(capsys, target, *args, *store, *traces)
    assert res.rc == rc, res.out + res.err
    assert text in res.out + res.err


def test_unreachable_trace_store_is_an_environment_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path / "p.toml", BOTH)
    res = run_verify(capsys, BINUTILS, "--policy", str(policy), "--store",
                     str(CONFORMANCE / "store"), "--traces", "http://127.0.0.1:9/")
    assert res.rc == 3
    assert "unreachable" in res.out + res.err


def test_version_and_help_import_no_subcommand() -> None:
    """``tracehook --version`` and ``--help`` import no subcommand module (fast start);
    a subcommand imports its own module only."""
    import subprocess
    import sys

    code = ("import sys, tracehook.cli as c\n"
            "try:\n    c.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('tracehook.') "
            "and m not in ('tracehook.cli',)), file=sys.stderr)")
    allowed: set[str] = set()
    for argv in (["--version"], ["--help"]):
        run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                             text=True, check=False)
        loaded = set(eval(run.stderr.strip().splitlines()[-1]))
        assert loaded <= allowed, loaded
    run = subprocess.run([sys.executable, "-c", code, "keygen", "--help"],
                         capture_output=True, text=True, check=False)
    loaded = set(eval(run.stderr.strip().splitlines()[-1]))
    assert "tracehook.cli.keygen" in loaded and "tracehook.cli.gate" not in loaded
    assert "tracehook.gate.service" not in loaded and "tracehook.verify.engine" not in loaded


def test_help_shows_the_engine_limits_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI writes Limits' defaults out (importing it would cost a replayed run)."""
    from tracehook import cli as cli_main
    from tracehook.verify.limits import Limits

    assert cli_main.main(["verify", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    d = Limits()
    assert f"(default: {d.max_depth})" in text
    assert f"(default: {d.max_resolutions})" in text
    assert f"(threads; default: {d.workers})" in text
    assert f"closures of {d.process_wait_from} or more derivations, or of {d.process_from}" in text
    assert f"once {d.process_backlog} checks wait" in text
