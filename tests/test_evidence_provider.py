"""Asking an evidence provider (sign.toml ``evidence-command``, docs/FORMAT.md 9.4): the
software provider script answers with an entry bound to the claim; every way a provider
can fail is an error of its own kind, never evidence."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from snp_provider import DEFAULT_MEASUREMENT, HERE, fixed_chain
from tracehook.errors import CommandFailed, EnvironmentFault, ParseError
from tracehook.stores.provider import request_evidence
from tracehook.trace.evidence import BoundClaim, BoundOutput, verify_evidence
from tracehook.trace.snproots import root_from_pem
from tracehook.trace.snpverify import SnpRequirements

OUT = "/nix/store/aa8ikhiac1834kaka8vnw5xbxs09472r-ia-c"
CLAIM = BoundClaim.of("ia", "gv7x6l1mkxil2443mwcjiz47hfng57l1",
                      {"out": BoundOutput(OUT, bytes(range(32)), (OUT,))})
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
PROVIDER = [sys.executable, str(HERE / "snp_provider.py")]


@pytest.fixture(scope="module")
def provider_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("provider")
    subprocess.run([*PROVIDER, "init", str(directory)], check=True, capture_output=True)
    return directory


def test_the_software_provider_answers_for_the_claim(provider_dir: Path) -> None:
    entry = request_evidence([*PROVIDER, "evidence", str(provider_dir)], CLAIM)
    assert entry.claim == CLAIM and entry.report.report_data == CLAIM.digest()
    root = root_from_pem("software", fixed_chain().root_pem(), "software root")
    requirements = SnpRequirements((root,), frozenset({DEFAULT_MEASUREMENT}))
    assert verify_evidence(entry, requirements, CLAIM.digest(), NOW).verified


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# attack or fault, command, error, text in the message
FAILURES: list[tuple[str, list[str], type[Exception], str]] = [
    ("provider-fails", _python("import sys; print('no /dev/sev-guest', file=sys.stderr); "
                               "sys.exit(1)"), CommandFailed,
     "exited 1: no /dev/sev-guest"),
    ("provider-prints-garbage", _python("print('hello')"), ParseError, "not JSON"),
    ("provider-answers-a-list", _python("print('[]')"), ParseError, "not a JSON object"),
    ("provider-answers-a-truncated-report",
     _python("import json; print(json.dumps({'kind': 'sev-snp', 'report': 'AAAA', "
             "'vcek': 'AAAA'}))"), ParseError, "report"),
    ("provider-hangs", _python("import time; time.sleep(30)"), CommandFailed, "timed out"),
    ("provider-missing", ["/nonexistent/snpguest"], EnvironmentFault, "not found"),
]


@pytest.mark.parametrize(("name", "command", "error", "text"), FAILURES,
                         ids=[f[0] for f in FAILURES])
def test_a_provider_that_gives_no_evidence(name: str, command: list[str],
                                           error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        request_evidence(command, CLAIM, timeout=2)


def test_a_report_for_another_claim_is_refused(provider_dir: Path) -> None:
    other = BoundClaim.of("ia", CLAIM.key, {"out": BoundOutput(OUT, bytes(32), ())})
    forwarding = _python(
        "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:-1] + "
        f"[{other.digest().hex()!r}]))")
    with pytest.raises(ParseError, match="not the digest it was asked for"):
        request_evidence([*forwarding, *PROVIDER, "evidence", str(provider_dir)], CLAIM)


def test_nix_config_is_not_forwarded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIX_CONFIG", "access-tokens = github.com=secret")
    monkeypatch.setenv("TRACEHOOK_TEST_SEEN", "yes")
    probe = _python("import os, sys; print(repr(os.environ.get('NIX_CONFIG')), "
                    "os.environ.get('TRACEHOOK_TEST_SEEN'), file=sys.stderr); sys.exit(3)")
    with pytest.raises(CommandFailed, match="exited 3: None yes"):
        request_evidence(probe, CLAIM)
