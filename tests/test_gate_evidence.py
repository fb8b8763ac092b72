"""The gate with hardware evidence, over real HTTP on 127.0.0.1, without Nix.

The store, cache and traces are made by hand (tests/gatekit.py ``make_synthetic``: one
input-addressed and one floating content-addressed derivation, signed by builderA); each
trace file also carries evidence from the software provider (tests/snp_provider.py, a
stand-in for hardware) bound to its claim. The gate admits a path only when the policy's
evidence element (alone, or with builderA's key) is satisfied, says which evidence admitted
it in its log line (and ``tracehook log`` shows it), and refuses with the reason named.
Negative cases are named after the attack.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from evidencekit import (
    OTHER_MEASUREMENT,
    Provider,
    bound,
    element,
    make_provider,
    read_file,
    set_evidence,
    write_policy,
)
from gatekit import Synthetic, make_synthetic, running_gate, write_gate_key
from test_gate_http import get
from testkeys import public_text
from tracehook import cli
from tracehook.nix.storepath import hash_part
from tracehook.trace import jws
from tracehook.trace.claim import parse_claim
from tracehook.trace.evidence import BoundClaim


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Provider:
    return make_provider(tmp_path_factory.mktemp("provider"))


def _claims(syn: Synthetic) -> dict[str, BoundClaim]:
    """Trace key -> the claim builderA signed there."""
    claims = {}
    for path in (syn.traces / "traces").iterdir():
        if not path.name.startswith("."):
            [token] = read_file(syn.traces, path.name)["signatures"]
            c = parse_claim(jws.parse_compact(token))
            claims[path.name] = bound(c.kind, c.key, c.outputs)
    return claims


Edit = Callable[[Provider, BoundClaim], list[dict[str, Any]]]
GOOD: Edit = lambda p, c: [p.entry(c)]  # noqa: E731

BOTH = '{ all-of = ["builderA", "snp"] }'

# name, require, extra element line, evidence edit (every step), allowed, text in log lines
CASES: list[tuple[str, str, str, Edit, bool, str]] = [
    ("evidence-only", '"snp"', "", GOOD, True,
     "and hardware evidence snp (sev-snp Test vcek, measurement 9e5b7ce84478c0b3..., chip "),
    ("2-of-2-evidence-and-key", BOTH, "", GOOD, True,
     "verified by traces signed by builderA and hardware evidence snp (sev-snp Test vcek"),
    ("unaccepted-guest-image", '"snp"', "",
     lambda p, c: [p.entry(c, measurement=OTHER_MEASUREMENT)], False,
     "not accepted by 'snp': measurement-not-accepted: measurement " + OTHER_MEASUREMENT.hex()),
    ("vcek-from-another-root", '"snp"', "", lambda p, c: [p.entry(c, chain=p.foreign)], False,
     "unknown-root"),
    ("stale-firmware", '"snp"', "", lambda p, c: [p.entry(c, chain=p.old)], False,
     "tcb-too-old"),
    ("2-of-2-evidence-removed", BOTH, "", lambda p, c: [], False,
     "missing snp; no hardware evidence for it"),
    ("revoked-element", BOTH, "revoked = true", GOOD, False, "evidence element 'snp' is revoked"),
]


@pytest.mark.parametrize(("name", "require", "extra", "edit", "allowed", "text"), CASES,
                         ids=[c[0] for c in CASES])
def test_gate_requires_evidence(name: str, require: str, extra: str, edit: Edit,
                                allowed: bool, text: str, provider: Provider, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    syn = make_synthetic(tmp_path / "syn")
    for key, claim in _claims(syn).items():
        set_evidence(syn.traces, key, edit(provider, claim))
    policy = write_policy(tmp_path / "policy.toml", require,
                          [element("snp", provider, extra=extra)],
                          {"builderA": public_text("builderA")},
                          [f"file://{syn.traces}"])
    gate_key, _ = write_gate_key(tmp_path)
    log_file, human = tmp_path / "gate.log", io.StringIO()
    with running_gate(policy, [f"file://{syn.cache}"], str(syn.root), log_file,
                      signing_key=gate_key, stderr=human) as gate:
        ia = get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0]
        ca = get(gate.url, f"/realisations/{syn.ca_id}.doi")[0]
        events = gate.events()
    assert (ia, ca) == ((200, 200) if allowed else (404, 404))
    outcome = "allowed" if allowed else "refused"
    lines = [e for e in events if e["outcome"] == outcome]
    assert {e["request"] for e in lines} == {"narinfo", "realisation"}, events
    said = [line for line in human.getvalue().splitlines() if f"{outcome} " in line]
    assert len(said) == 2 and all(text in line for line in said), said
    for line in lines:
        if allowed:
            assert "snp" in line["signers"]  # type: ignore[operator]
            evidence: list[dict[str, str]] = line["evidence"]  # type: ignore[assignment]
            [info] = evidence
            assert info["element"] == "snp" and info["product"] == "Test"
            assert info["chip_id"] == provider.chain.chip_id.hex()
            assert info["tcb"] == "bootloader=9 tee=0 snp=23 microcode=72"
        else:
            assert text in str(line["reason"])
    if allowed:  # tracehook log shows which evidence admitted each path
        capsys.readouterr()
        assert cli.main(["log", str(log_file)]) == 0
        view = capsys.readouterr().out
        assert "hardware evidence snp (measurement 9e5b7ce84478c0b3..., chip" in view, view
        assert "tcb bootloader=9 tee=0 snp=23 microcode=72)" in view


def test_a_step_without_evidence_is_named(provider: Provider, tmp_path: Path) -> None:
    """Evidence removed from one step only: that step is refused and named, the other is
    still admitted."""
    syn = make_synthetic(tmp_path / "syn")
    claims = _claims(syn)
    for key, claim in claims.items():
        set_evidence(syn.traces, key, [provider.entry(claim)])
    ia_key = next(k for k, c in claims.items() if c.kind == "ia")
    set_evidence(syn.traces, ia_key, [])
    policy = write_policy(tmp_path / "policy.toml", '"snp"', [element("snp", provider)],
                          traces=[f"file://{syn.traces}"])
    with running_gate(policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 404
        assert get(gate.url, f"/realisations/{syn.ca_id}.doi")[0] == 200
        [refused] = gate.refusals()
    assert refused["drv"] == syn.ia_drv and refused["name"] == "hello"
    assert str(refused["reason"]).startswith(f"no trusted claim for ia:{ia_key}: signed by "
                                             "unknown key builderA:")
    assert str(refused["reason"]).endswith("; no hardware evidence for it")
