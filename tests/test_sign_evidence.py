"""The signer's side of hardware evidence (docs/FORMAT.md 9.2 and 9.4), without Nix:
sign.toml's ``evidence-command``, spool entries that carry evidence (and older ones that do
not), a publisher that delivers it with the signature and counts a claim as delivered only
when its evidence is there too, and a hook that loads none of it unless asked.
(tests/test_gate_evidence_nix.py runs the hook with real Nix.)
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from evidencekit import Provider, bound
from snp_provider import FIXED_CHAIN, fixed_chain
from spoolhelp import make_entry
from tracehook.errors import ConfigError, ParseError
from tracehook.nix.nar import parse_nar_hash
from tracehook.signer import config
from tracehook.signer.publish import Publisher
from tracehook.stores import tracestore
from tracehook.stores.eventlog import EventLog
from tracehook.stores.spool import Spool, SpoolEntry
from tracehook.trace.claim import OutputClaim
from traceserver import serve_traces


def evidence_for(entry: SpoolEntry, other: SpoolEntry | None = None) -> dict[str, Any]:
    """An evidence entry (the committed software chain) for ``entry``'s claim, or one that
    carries ``other``'s claim."""
    source = other or entry
    outputs = {n: OutputClaim(o["path"], parse_nar_hash(o["hash"]), ())
               for n, o in source.outputs.items()}
    claim = bound("ca", source.key, outputs)
    return Provider(fixed_chain(), FIXED_CHAIN).entry(claim)


def with_evidence(n: int, **kw: Any) -> SpoolEntry:
    entry = make_entry(n, **kw)
    return dataclasses.replace(entry, evidence=(evidence_for(entry),))


def quiet(tmp: Path) -> EventLog:
    return EventLog(tmp / "publish.log", stderr=None)


# ----------------------------------------------------------------------------- sign.toml


def test_evidence_command_settings(tmp_path: Path) -> None:
    path = tmp_path / "sign.toml"
    path.write_text('evidence-command = ["snpguest-wrapper", "--vcek", "/var/lib/vcek.der"]\n'
                    "evidence-timeout = 2.5\n")
    cfg = config.load(path, environ={})
    assert cfg.evidence_command == ("snpguest-wrapper", "--vcek", "/var/lib/vcek.der")
    assert cfg.evidence_timeout == 2.5
    path.write_text("")
    cfg = config.load(path, environ={})
    assert (cfg.evidence_command, cfg.evidence_timeout) == ((), 10.0)


@pytest.mark.parametrize(("text", "message"), [
    ("evidence-command = []", "program and its arguments"),
    ('evidence-command = ["ok", ""]', "program and its arguments"),
    ('evidence-command = ["ok", 3]', "program and its arguments"),
    ('evidence-command = "snpguest report"', "must be a list"),
    ("evidence-timeout = 0", "above 0"),
    ("evidence-timeout = 86400", "at most 3600"),
    ('evidence-timeout = "10"', "must be a int or float"),
    ('evidence-comand = ["x"]', "unknown setting 'evidence-comand'"),
], ids=["empty", "empty-argument", "not-a-string", "a-shell-string", "zero-timeout",
        "day-long-timeout", "timeout-as-string", "typo"])
def test_evidence_command_mistakes(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "sign.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, environ={})
    assert message in err.value.diagnostics()


# ----------------------------------------------------------------------------- the spool


def test_spool_entries_carry_evidence_and_older_ones_still_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    entry = with_evidence(1)
    path = spool.add(entry)
    assert path is not None
    assert spool.pending()[0].entry == entry
    assert json.loads(path.read_text())["evidence"] == list(entry.evidence)
    # The same claim without evidence is the same entry name (evidence is not the claim).
    assert make_entry(1).name == entry.name and spool.add(make_entry(1)) is None
    # An entry written before evidence existed: no "evidence" field, read as none.
    old = json.loads(make_entry(2).to_json())
    assert "evidence" not in old
    assert SpoolEntry.from_json(json.dumps(old).encode(), "old").evidence == ()
    with pytest.raises(ParseError, match="evidence"):
        SpoolEntry.from_json(json.dumps({**old, "evidence": "AAAA"}).encode(), "bad")


# ----------------------------------------------------------------------------- publishing


def test_evidence_is_delivered_with_the_signature(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    entries = [with_evidence(i) for i in range(2)]
    for entry in entries:
        spool.add(entry)
    with serve_traces() as server:
        stores = [tracestore.open_store(f"file://{tmp_path}/ts"),
                  tracestore.open_store(server.url)]
        report = Publisher(spool, stores, quiet(tmp_path)).drain()
        assert report.complete and len(report.delivered) == 2
        for store in stores:
            for entry in entries:
                doc = store.read(entry.key)
                assert doc.signatures == (entry.jws,)
                assert list(doc.evidence) == list(entry.evidence)
    logged = [json.loads(line) for line in (tmp_path / "publish.log").read_text().splitlines()]
    assert [e["evidence"] for e in logged if e["outcome"] == "ok"] == [1, 1]


def test_a_store_with_the_claim_but_not_its_evidence_gets_the_evidence(tmp_path: Path
                                                                       ) -> None:
    """The store holds the same claim (signed on an earlier run): delivered means the
    evidence is there too, and the signature is not added twice."""
    spool = Spool(tmp_path / "spool")
    entry = with_evidence(1, rebuild_id=5)
    spool.add(entry)
    store = tracestore.open_store(f"file://{tmp_path}/ts")
    earlier = make_entry(1, rebuild_id=4)
    store.append(earlier.key, [earlier.jws])
    assert Publisher(spool, [store], quiet(tmp_path)).drain().complete
    doc = store.read(entry.key)
    assert doc.signatures == (earlier.jws,) and list(doc.evidence) == list(entry.evidence)


def test_a_store_with_claim_and_evidence_gets_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    entry = with_evidence(1)
    spool.add(entry)
    store = tracestore.open_store(f"file://{tmp_path}/ts")
    store.append(entry.key, [make_entry(1, rebuild_id=9).jws],
                 [json.loads(json.dumps(entry.evidence[0], sort_keys=True))])  # key order
    file = tmp_path / "ts" / "traces" / entry.key
    before = (file.read_bytes(), file.stat().st_mtime_ns)
    assert Publisher(spool, [store], quiet(tmp_path)).drain().complete
    assert (file.read_bytes(), file.stat().st_mtime_ns) == before
    assert spool.pending() == [] and len(spool.sent()) == 1


@pytest.mark.parametrize("case", ["evidence-for-another-claim", "malformed-evidence"])
def test_evidence_that_can_never_be_published_goes_to_bad(case: str, tmp_path: Path) -> None:
    entry = make_entry(1)
    bad = (evidence_for(entry, other=make_entry(2)) if case.startswith("evidence-for")
           else {"kind": "sev-snp", "report": "AAAA"})
    spool = Spool(tmp_path / "spool")
    spool.add(dataclasses.replace(entry, evidence=(bad,)))
    spool.add(with_evidence(3))
    store = tracestore.open_store(f"file://{tmp_path}/ts")
    report = Publisher(spool, [store], quiet(tmp_path)).drain()
    assert len(report.bad) == 1 and len(report.delivered) == 1
    assert store.read(entry.key).signatures == ()
    said = (tmp_path / "publish.log").read_text()
    assert ("binds ca key" in said) if case.startswith("evidence-for") else ("claim" in said)


# ----------------------------------------------------------------------------- the hook


def test_a_hook_without_evidence_command_loads_none_of_it() -> None:
    """The hook's fast path and its in-process signer import nothing for evidence (the
    provider, the evidence format, the X.509 library) unless sign.toml asks for it."""
    code = (
        "import sys\n"
        "import tracehook.signer.agent_client, tracehook.signer.hook\n"
        "from tracehook.signer import config\n"
        "config.load(None, {'TRACEHOOK_CONFIG': '/dev/null'})\n"
        "bad = [m for m in ('tracehook.stores.provider', 'tracehook.trace.evidence',\n"
        "       'tracehook.stores.proc', 'cryptography', 'subprocess') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
