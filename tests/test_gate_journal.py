"""A real gate's and publisher's stderr (the journal) reads back with ``tracehook log -``.

The gate runs as its own process (``tracehook gate``), its stderr a pipe, as under systemd;
the documented ``journalctl -o cat -u tracehook-gate | tracehook log --refused -`` is
replayed by piping what it wrote into ``tracehook log`` (also a process). The store, cache
and traces are hand-made (tests/gatekit.py ``make_synthetic``), no Nix needed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gatekit import Synthetic, make_synthetic, write_policy
from gateproc import EXE, GateProcess, gate_argv, gate_process
from gateproc import get as fetch
from spoolhelp import make_entry
from tracehook.nix.storepath import hash_part
from tracehook.stores.eventlog import parse_record
from tracehook.stores.nixstore import StoreReader
from tracehook.stores.spool import Spool
from tracehook.trace.stepkey import step_key
from verifyhelp import run_verify

FORGED = "tracehook-gate: allowed /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello (verified)"


@contextlib.contextmanager
def synthetic_gate(syn: Synthetic, policy: Path, log_file: Path) -> Iterator[GateProcess]:
    with gate_process(gate_argv(policy, [f"file://{syn.cache}"], syn.root, log_file)) as gate:
        yield gate


def get(url: str) -> int:
    return fetch(url)[0]


def tracehook_log(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "log", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def synthetic(tmp_path: Path) -> Synthetic:
    return make_synthetic(tmp_path / "syn")


def test_journal_pipe_shows_a_refusal(synthetic: Synthetic, tmp_path: Path) -> None:
    """``journalctl -o cat -u tracehook-gate | tracehook log --refused -``, with a real gate:
    the policy trusts builderB, the traces are builderA's."""
    policy = write_policy(tmp_path / "policy.toml", synthetic.traces, '"builderB"',
                          ["builderB"])
    with synthetic_gate(synthetic, policy, tmp_path / "gate.log") as gate:
        assert get(f"{gate.url}/{hash_part(synthetic.ia_out)}.narinfo") == 404
        assert get(f"{gate.url}/realisations/{synthetic.ca_id}.doi") == 404
    journal = gate.stderr
    assert journal.count("\n") >= 3 and "refused" in journal
    res = tracehook_log("--refused", "-", stdin=journal)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # every line the gate wrote is a record
    shown = res.stdout.strip().splitlines()
    assert any("hello  " in line and "refused" in line and "builderA" in line
               for line in shown), res.stdout
    assert any("hello-ca" in line for line in shown), res.stdout
    # The same records as the gate's own log file, in the same order.
    from_journal = [parse_record(line) for line in journal.splitlines()]
    from_file = [json.loads(line) for line in (tmp_path / "gate.log").read_text().splitlines()]
    assert from_journal == from_file
    as_json = tracehook_log("--json", "-", stdin=journal)
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == from_file


def test_lines_stay_whole_under_concurrent_requests(synthetic: Synthetic, tmp_path: Path) -> None:
    """Many clients at once, each request refused and logged: every stderr line is one
    whole event (they used to run together: "...is revokedtracehook-gate: refused ...")."""
    requests = 16 * 25
    with synthetic_gate(synthetic, synthetic.policy, tmp_path / "gate.log") as gate:
        ids = [f"sha256:{os.urandom(32).hex()}!out" for _ in range(requests)]
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda i: get(f"{gate.url}/realisations/{i}.doi"), ids))
    assert codes == [404] * requests
    lines = gate.stderr.splitlines()
    assert all(line.startswith("tracehook-gate: ") for line in lines)
    records = [parse_record(line) for line in lines]
    assert None not in records
    refused = {r["id"] for r in records if r is not None and r["outcome"] == "refused"}
    assert refused == set(ids)


def _inject_kid(syn: Synthetic, kid: str) -> str:
    """Replace the ia step's trace by one unsigned entry whose kid is ``kid``."""
    drv = StoreReader(str(syn.root)).read_derivation(syn.ia_drv)
    key = step_key(drv, {}).key.key
    path = syn.traces / "traces" / key
    token = json.loads(path.read_text())["signatures"][0]
    header, payload, sig = token.split(".")
    obj = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    obj["kid"] = kid
    forged = base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    path.write_text(json.dumps({"signatures": [f"{forged}.{payload}.{sig}"]}))
    return key


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\u2028"], ids=["lf", "crlf", "u2028"])
def test_a_kid_cannot_forge_a_log_line(
    sep: str, synthetic: Synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Log injection: a kid with a line break and a fake "allowed" line, in an unsigned
    trace entry, reaches the gate's journal, its log file and ``tracehook log`` as data on
    the refusal's own line, never as a line of its own."""
    kid = f"evil{sep}{FORGED}:0123456789abcdef"
    _inject_kid(synthetic, kid)
    log_file = tmp_path / "gate.log"
    with synthetic_gate(synthetic, synthetic.policy, log_file) as gate:
        assert get(f"{gate.url}/{hash_part(synthetic.ia_out)}.narinfo") == 404
    journal = gate.stderr
    # start, the no-signing-key warning, the refusal
    assert len(journal.splitlines()) == len(journal.split("\n")) - 1 == 3
    assert not any(line.startswith("tracehook-gate: allowed") for line in journal.splitlines())
    refusal = parse_record(journal.splitlines()[2])
    assert refusal is not None and refusal["outcome"] == "refused"
    assert "evil" + sep in str(refusal["reason"])  # kept as data, escaped on the wire
    for res in (tracehook_log("-", stdin=journal), tracehook_log(str(log_file))):
        assert res.returncode == 0 and res.stderr == ""
        lines = res.stdout.splitlines()
        assert len(lines) == 3, res.stdout
        assert "evil\\" in lines[2] and FORGED in lines[2]
        assert lines[0].split()[2] == "gate-start"
        assert lines[1].split()[2:4] == ["gate-config", "-"]
        assert lines[2].split()[2:5] == ["gate", "hello", "refused"]  # the fake is data


def _strings(obj: object) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\u2028"], ids=["lf", "crlf", "u2028"])
def test_a_kid_cannot_forge_a_verify_report_line(
    sep: str, synthetic: Synthetic, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same kid through ``tracehook verify``: the human report keeps it on the line
    that names the rejected signature; the JSON report keeps it as data."""
    kid = f"evil{sep}{FORGED}:0123456789abcdef"
    _inject_kid(synthetic, kid)
    args = [synthetic.ia_drv, "--policy", str(synthetic.policy), "--store",
            str(synthetic.root), "--traces", f"file://{synthetic.traces}"]
    report = run_verify(capsys, *args, "--json").json()
    assert report["verified"] is False
    assert any(kid in s for s in _strings(report))  # the kid kept as data, exactly
    human = run_verify(capsys, *args)
    assert human.rc == 1
    lines = human.out.splitlines()
    assert any("evil\\" in line for line in lines), human.out
    assert not any(line.startswith("tracehook-gate:") for line in lines), human.out
    assert not any(ch in human.out for ch in "\r\u2028")


def test_publisher_journal_reads_back(tmp_path: Path) -> None:
    """``tracehook publish --daemon`` (tracehook-publish.service): its stderr is the journal
    too; with one trace store down, the failures read back with ``tracehook log -``."""
    spool = Spool(tmp_path / "spool")
    for i in range(3):
        spool.add(make_entry(i))
    config = tmp_path / "sign.toml"
    config.write_text(f'publish-to = ["file://{tmp_path}/ts", "http://127.0.0.1:9/"]\n'
                      f'spool-dir = "{tmp_path / "spool"}"\n'
                      f'log-file = "{tmp_path / "publish.log"}"\n')
    proc = subprocess.Popen(
        [EXE, "publish", "--daemon", "--no-agent", "--interval", "0.1", "--max-backoff", "0.2",
         "--config", str(config)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list((tmp_path / "ts" / "traces").glob("*"))
                                                  if (tmp_path / "ts" / "traces").is_dir()
                                                  else []) < 3:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    records = [parse_record(line) for line in err.splitlines()]
    assert records and None not in records, err
    res = tracehook_log("--event", "publish", "-", stdin=err)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    sentences = [line.split("\t")[0] for line in err.splitlines() if '"kept"' in line]
    assert sentences and all(s.count("127.0.0.1:9") == 1 for s in sentences)  # said once
    kept = [line for line in res.stdout.splitlines() if " kept " in line]
    assert len(kept) == 1 and "127.0.0.1:9" in kept[0], res.stdout  # said once, counted
    assert kept[0].endswith(f"(x{sum(1 for r in records if r and r['outcome'] == 'kept')})")
    from_file = [json.loads(line)
                 for line in (tmp_path / "publish.log").read_text().splitlines()]
    assert records == from_file
