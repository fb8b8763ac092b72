"""The laut v2 conformance table (tests/data/laut-v2/README.md), through the CLI.

The .drv files and traces are laut's own, vendored in tests/data/laut-v2 and read in place
(``--store <data>/store --traces file://<data>``); every stage1 row verifies from laut's own
signatures, the two stage1 links gnu-config (``0cc015dv...``) and update-autotools-hook
(``f9cjc7lm...``) included. Rows that need modified traces copy them into tmp_path first.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from testkeys import CONFORMANCE, STAGE1
from tracehook import cli
from tracehook.trace import jws
from verifyhelp import run_verify, write_policy

STORE = str(CONFORMANCE / "store")
TRACES = f"file://{CONFORMANCE}"
STAGE1_OUT = "/nix/store/46f69c5mdfn57k6vmfzlwg23c3dzr1md-bootstrap-stage1-stdenv-linux"
BINUTILS = "/nix/store/6a4wpppqvmf5dwr49gfm3hrxhd58hg0w-bootstrap-stage0-binutils-wrapper-.drv"
BINUTILS_OUT = "/nix/store/j87rlazyfsgd5xg9ppz1jhmagxbk46mn-bootstrap-stage0-binutils-wrapper-"
GNU_CONFIG_KEY = "0cc015dvwcgag5w82s12yl9ldjpg3qrr"
HOOK_KEY = "f9cjc7lm0wk3bajxwdf4qh5dhvb4p4qh"
BOTH = '{ all-of = ["builderA", "builderB"] }'
EITHER = '{ threshold = 1, of = ["builderA", "builderB"] }'


@pytest.fixture(scope="module")
def chain_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Step name -> resolved key, for the stage1 chain (from a verified run's JSON)."""
    policy = write_policy(tmp_path_factory.mktemp("p") / "p.toml", BOTH)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["verify", STAGE1, "--policy", str(policy), "--store", STORE,
                       "--traces", TRACES, "--json"])
    assert rc == 0
    steps = json.loads(buf.getvalue())["steps"]
    return {s["name"]: s["resolved_keys"][0].split(":")[1] for s in steps if s["resolved_keys"]}


def test_checker_processes_give_the_same_report(tmp_path: Path) -> None:
    """The stage1 target checked in two worker processes, and in threads: one JSON report."""
    policy = write_policy(tmp_path / "p.toml", BOTH)
    out = []
    for processes in ("2", "0"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cli.main(["verify", STAGE1, "--policy", str(policy), "--store", STORE,
                           "--traces", TRACES, "--json",
                           "--processes", processes, "--at", "2026-01-01T00:00:00Z"])
        assert rc == 0
        out.append(json.loads(buf.getvalue()))
    assert out[0] == out[1]
    assert out[0]["verified"] is True


def _copy_traces(tmp: Path) -> Path:
    dest = tmp / "copy"
    shutil.copytree(CONFORMANCE / "traces", dest / "traces")
    for f in (dest / "traces").iterdir():
        f.chmod(0o644)
    return dest


def _edit_trace(store: Path, key: str, signer: str, edit: str) -> None:
    path = store / "traces" / key
    doc = json.loads(path.read_bytes())
    sigs = doc["signatures"]
    index = next(i for i, s in enumerate(sigs) if f'"builder{signer[-1]}:' in
                 base64.urlsafe_b64decode(s.split(".")[0] + "==").decode())
    if edit == "remove":
        del sigs[index]
    else:
        h, p, s = sigs[index].split(".")
        if edit == "payload-byte":  # change one byte of the decoded payload, JSON stays valid
            payload = bytearray(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
            at = payload.index(b'"path":"/nix/store/') + len(b'"path":"/nix/store/')
            payload[at] = ord("0") if payload[at] != ord("0") else ord("1")
            p = base64.urlsafe_b64encode(bytes(payload)).rstrip(b"=").decode()
        else:  # "b64-char": one character of the transmitted payload text
            mid = len(p) // 2
            p = p[:mid] + ("A" if p[mid] != "A" else "B") + p[mid + 1:]
        sigs[index] = f"{h}.{p}.{s}"
    path.write_text(json.dumps(doc, indent=2) + "\n")


# name, target, policy, trace setup, (expected rc, expected output, text expected in report)
# Trace setup: "in-place" reads the vendored traces as they are; "<edit>-<signer>" edits one
# signer's entry in the trace of the step named by the row (a copy in tmp_path); "delete"
# removes that step's trace file from a copy.
ROWS = [
    ("stage1-A-and-B", STAGE1, BOTH, "in-place", 0, STAGE1_OUT,
     "mdw7ghk4133r650ali5jdmgqi4ccwp65"),
    ("stage1-A-only", STAGE1, '"builderA"', "in-place", 0, STAGE1_OUT, ""),
    ("stage1-B-only", STAGE1, '"builderB"', "in-place", 0, STAGE1_OUT, ""),
    ("stage1-1-of-A-B", STAGE1, EITHER, "in-place", 0, STAGE1_OUT, ""),
    ("binutils-A-and-B", BINUTILS, BOTH, "in-place", 0, BINUTILS_OUT,
     "286wqgdqv715j8yrca9lkzhyk9j3s9a8"),
    ("stage1-without-the-gnu-config-link", STAGE1, BOTH, "delete", 1, None,
     f"no trace for resolved step ca:{GNU_CONFIG_KEY}"),
    ("removed-B-signature-2-of-2", STAGE1, BOTH, "remove-B", 1, None, "missing builderB"),
    ("removed-B-signature-1-of-2", STAGE1, EITHER, "remove-B", 0, STAGE1_OUT, ""),
    ("tampered-payload-byte-A-only", STAGE1, '"builderA"', "payload-byte-A", 1, None,
     "bad signature"),
    ("tampered-b64-char-A-only", STAGE1, '"builderA"', "b64-char-A", 1, None, "bad signature"),
    ("unknown-key-only", STAGE1, '"builderC"', "in-place", 1, None, "no trusted claim"),
]
# The step each edit applies to: deep in the chain, two levels above the sources; "delete"
# takes away one of the two links an earlier copy of this data lacked.
EDITED_STEP = {"delete": "gnu-config-2024-01-01"}
TAMPERED_STEP = "bootstrap-tools"


@pytest.mark.parametrize(("name", "target", "require", "setup", "rc", "out", "text"), ROWS,
                         ids=[r[0] for r in ROWS])
def test_conformance_row(
    name: str, target: str, require: str, setup: str, rc: int, out: str | None, text: str,
    chain_keys: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    keys = ["builderC"] if "builderC" in require else ["builderA", "builderB"]
    policy = write_policy(tmp_path / "policy.toml", require, keys)
    step = EDITED_STEP.get(setup, TAMPERED_STEP)
    traces = ["--traces", TRACES]
    if setup != "in-place":
        copy = _copy_traces(tmp_path)
        if setup == "delete":
            (copy / "traces" / chain_keys[step]).unlink()
        else:
            edit, signer = setup.rsplit("-", 1)
            _edit_trace(copy, chain_keys[step], signer, edit)
        traces = ["--traces", f"file://{copy}"]
    args = [target, "--policy", str(policy), "--store", STORE, *traces]
    human = run_verify(capsys, *args)
    result = run_verify(capsys, *args, "--json")
    assert (human.rc, result.rc) == (rc, rc), human.out + human.err
    report = result.json()
    assert report["verified"] is (rc == 0)
    assert report["target"] == target
    if out is not None:
        assert report["outputs"] == {"out": out}
        assert f"out: {out}" in human.out
    if text:
        assert text in human.out + json.dumps(report)
    if rc == 1:
        failed = report["failed_step"]
        assert failed is not None and failed["name"] in human.out
        if setup != "in-place":
            assert failed["name"] == step
            assert chain_keys[step] in human.out


def test_stage1_json_names_each_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = write_policy(tmp_path / "p.toml", BOTH)
    res = run_verify(capsys, STAGE1, "--policy", str(policy), "--store", STORE, "--traces",
                     TRACES, "--json")
    report = res.json()
    target = next(s for s in report["steps"] if s["drv"] == STAGE1)
    assert target["resolved_keys"] == ["ca:mdw7ghk4133r650ali5jdmgqi4ccwp65"]
    assert target["signers"] == ["builderA", "builderB"]
    outcomes = sorted(s["outcome"] for s in report["steps"])
    assert outcomes == ["fixed-output"] * 4 + ["verified"] * 8


@pytest.mark.parametrize(("name", "key"), [("gnu-config-2024-01-01", GNU_CONFIG_KEY),
                                           ("update-autotools-gnu-config-scripts-hook",
                                            HOOK_KEY)])
def test_stage1_links_verify_from_lauts_own_signatures(
    name: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The two links an earlier copy of the data lacked: laut's own trace files, both
    signers counted, nothing re-signed by this suite (only laut's two kids are in them)."""
    doc = json.loads((CONFORMANCE / "traces" / key).read_bytes())
    kids = sorted(str(jws.kid_of(jws.parse_compact(t))) for t in doc["signatures"])
    assert kids == ["builderA:bcda8d54470fea3b", "builderB:d9780179d7239d51"]
    policy = write_policy(tmp_path / "p.toml", BOTH)
    report = run_verify(capsys, STAGE1, "--policy", str(policy), "--store", STORE,
                        "--traces", TRACES, "--json").json()
    [step] = [s for s in report["steps"] if s["name"] == name]
    assert step["resolved_keys"] == [f"ca:{key}"]
    assert step["signers"] == ["builderA", "builderB"]
    assert step["outcome"] == "verified"
