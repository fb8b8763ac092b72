"""Verifying ahead: the closures of .drv files just written are decided before Nix asks
(``--verify-ahead``), and nothing is answered or logged from that until a request asks."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gatekit import RunningGate, running_gate
from gateproc import wait_for
from test_gate_http import get
from tracehook.gate.index import ahead_roots

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synth import generate, with_policy


def _consumer(tmp_path: Path, built: Path) -> tuple[Path, list[Path]]:
    """An empty consumer store (its root) and the .drv files of the store at ``built``."""
    root = tmp_path / "consumer"
    (root / "nix" / "store").mkdir(parents=True)
    return root, sorted((built / "nix" / "store").glob("*.drv"))


def _instantiate(root: Path, drvs: list[Path]) -> None:
    """Write the .drv files into the consumer's store, as nix-instantiate does."""
    for drv in drvs:
        shutil.copy(drv, root / "nix" / "store" / drv.name)


def _indexed_not_decided(gate: RunningGate, drvs: list[Path]) -> None:
    """Wait until ``gate``'s index holds every one of ``drvs``; then, a moment later, the
    gate has decided nothing."""
    index, verifier = gate.server.service.index, gate.server.service.verifier
    wait_for(lambda: len(index) == len(drvs), 10)
    time.sleep(0.3)
    assert verifier.steps_planned == 0


def test_the_roots_are_the_files_no_other_names_as_an_input() -> None:
    recent = {"/s/a.drv": ("/s/b.drv",), "/s/b.drv": ("/s/c.drv", "/s/old.drv"),
              "/s/c.drv": (), "/s/d.drv": ()}
    assert ahead_roots(recent) == ["/s/a.drv", "/s/d.drv"]
    assert ahead_roots({}) == []
    # a cycle names every file (Nix never writes one; the walk reports it if asked)
    assert ahead_roots({"/s/x.drv": ("/s/y.drv",), "/s/y.drv": ("/s/x.drv",)}) == []


def test_a_closure_written_while_the_gate_runs_is_decided_before_a_request(
        tmp_path: Path) -> None:
    """The whole closure is decided from the index's look at the new .drv files alone;
    the requests that follow find every step decided (nothing planned again), and a step
    that does not verify is logged as refused only when a request asks for it."""
    closure, policy = with_policy(tmp_path / "built", 80)
    missing = sorted((closure.traces / "traces").iterdir())[0]
    missing.unlink()  # one step's trace: it and the steps above it do not verify
    root, drvs = _consumer(tmp_path, closure.root)
    log_file = tmp_path / "gate.log"
    with running_gate(policy, [f"file://{closure.cache}"], str(root), log_file,
                      index_interval=0.05) as gate:
        verifier = gate.server.service.verifier
        _instantiate(root, drvs)
        # every .drv file is a step of the closure: each planned once
        wait_for(lambda: verifier.steps_planned == len(drvs), 10)
        assert not log_file.exists() or "refused" not in log_file.read_text()  # not asked
        answers = [get(gate.url, real)[0] for real, _ in closure.requests() if real]
        assert 404 in answers and 200 in answers  # the missing trace, the steps below it
        assert verifier.steps_planned == len(drvs)  # every step was decided ahead
        top = f"/realisations/{closure.realisation_ids[closure.target]}.doi"
        status, body = get(gate.url, top)
        assert status == 404 and b"refused" in body, body
        assert "refused" in log_file.read_text()


def test_verify_ahead_0_decides_only_what_requests_ask(tmp_path: Path) -> None:
    closure, policy = with_policy(tmp_path / "built", 80)
    root, drvs = _consumer(tmp_path, closure.root)
    with running_gate(policy, [f"file://{closure.cache}"], str(root), tmp_path / "gate.log",
                      index_interval=0.05, verify_ahead=0) as gate:
        verifier = gate.server.service.verifier
        _instantiate(root, drvs)
        _indexed_not_decided(gate, drvs)
        real = f"/realisations/{closure.realisation_ids[closure.steps[0][0]]}.doi"
        assert get(gate.url, real)[0] == 200
        assert 0 < verifier.steps_planned < len(closure.steps)  # that step's closure only


def test_drv_files_written_before_the_window_are_not_verified_ahead(tmp_path: Path) -> None:
    """A store's older .drv files (a gate starting on a store instantiated long ago) are
    indexed but not decided until asked; many written within the window are."""
    closure, policy = with_policy(tmp_path / "built", 80)
    root, drvs = _consumer(tmp_path, closure.root)
    _instantiate(root, drvs)
    time.sleep(1.2)  # older than the window below
    with running_gate(policy, [f"file://{closure.cache}"], str(root), tmp_path / "gate.log",
                      index_interval=0.05, verify_ahead=1.0) as gate:
        verifier = gate.server.service.verifier
        _indexed_not_decided(gate, drvs)
        # another closure instantiated now: decided at once
        other = generate(tmp_path / "other", 150, seed=2, store=root)
        wait_for(lambda: verifier.steps_planned >= len(other.steps), 10)


def test_a_few_new_drv_files_are_decided_when_asked(tmp_path: Path) -> None:
    """Fewer new .drv files than AHEAD_MIN within the window (a small change): nothing is
    decided until a request asks."""
    from tracehook.gate.index import AHEAD_MIN

    closure, policy = with_policy(tmp_path / "built", 10)
    root, drvs = _consumer(tmp_path, closure.root)
    assert len(drvs) < AHEAD_MIN
    with running_gate(policy, [f"file://{closure.cache}"], str(root), tmp_path / "gate.log",
                      index_interval=0.05) as gate:
        _instantiate(root, drvs)
        _indexed_not_decided(gate, drvs)
        top = f"/realisations/{closure.realisation_ids[closure.target]}.doi"
        assert get(gate.url, top)[0] == 200


def test_a_failure_deciding_ahead_is_logged_and_the_scan_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bug in what the index tells does not stop indexing: every .drv is indexed, the
    failure is logged once; a .drv that does not parse is indexed as before (skipped, with
    why) and is no root."""
    from tracehook.gate.index import DrvIndex
    from tracehook.stores.nixstore import StoreReader

    closure = generate(tmp_path / "built", 5)
    store = closure.root / "nix" / "store"
    (store / ("0" * 32 + "-junk.drv")).write_text("Derive(oops")
    index = DrvIndex(StoreReader(str(closure.root)))
    told: list[list[str]] = []

    def broken(roots: list[str]) -> None:
        told.append(roots)
        raise RuntimeError("a bug")

    index.ahead, index.ahead_window, index.ahead_min = broken, 600.0, 1
    caplog.set_level(logging.INFO, logger="tracehook.gate.index")
    drvs = [p for p in store.glob("*.drv") if not p.name.endswith("-junk.drv")]
    assert index.refresh() == len(drvs)
    assert len(told) == 1 and closure.target in told[0]  # (and sources nothing uses)
    assert "verifying ahead failed" in caplog.text
    assert any(p.endswith("-junk.drv") for p in index.skipped)


def test_deciding_ahead_under_a_broken_policy_does_nothing(tmp_path: Path) -> None:
    """While the policy file does not parse, requests answer 503; nothing is decided ahead
    (and nothing raises into the index)."""
    from tracehook.errors import ConfigError
    from tracehook.gate.verdicts import GateVerifier
    from tracehook.stores.nixstore import StoreReader

    closure = generate(tmp_path / "built", 5)

    def broken() -> Any:
        raise ConfigError("policy.toml: line 1: expected '='")

    verifier = GateVerifier(broken, StoreReader(str(closure.root)))
    verifier.ahead([closure.target])
    assert verifier.steps_planned == 0
    verifier.close()
