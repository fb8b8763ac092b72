"""The gate reading traces and the binary cache from S3 buckets on a real SeaweedFS,
anonymously: a verified closure is allowed (narinfo, realisation, NAR streamed from the
bucket), a tampered trace is refused, and a bucket that cannot be read is a 502, never a
refusal and never an allow. The store, traces and cache are made by hand
(tests/gatekit.py ``make_synthetic``), then uploaded through the project's S3 client.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatekit import Synthetic, make_synthetic, running_gate, write_gate_key
from seaweed import Seaweed, upload_tree
from test_gate_http import get
from testkeys import public_text
from tracehook.cli.demo import tamper_trace_file
from tracehook.nix import realisation
from tracehook.nix.storepath import basename, hash_part


def s3_policy(path: Path, traces_url: str) -> Path:
    path.write_text(f"traces = [{json.dumps(traces_url)}]\n\n[keys]\n"
                    f'builderA = {{ key = "{public_text("builderA")}" }}\n\n'
                    '[trust]\nrequire = "builderA"\n')
    return path


@pytest.fixture
def buckets(seaweed: Seaweed, tmp_path: Path) -> tuple[Synthetic, str, str]:
    """(the synthetic store, the traces URL, the cache URL), uploaded to new buckets."""
    syn = make_synthetic(tmp_path / "syn")
    traces, cache = seaweed.bucket("gate-traces"), seaweed.bucket("gate-cache")
    assert upload_tree(seaweed.client(traces), syn.traces) == 2
    assert upload_tree(seaweed.client(cache), syn.cache) >= 5
    return syn, seaweed.url(traces), seaweed.url(cache)


def test_gate_allows_verified_closure_from_buckets(
    buckets: tuple[Synthetic, str, str], anonymous_env: dict[str, str], tmp_path: Path
) -> None:
    syn, traces_url, cache_url = buckets
    policy = s3_policy(tmp_path / "policy.toml", traces_url)
    gate_key, _ = write_gate_key(tmp_path)
    with running_gate(policy, [cache_url], str(syn.root), tmp_path / "gate.log",
                      signing_key=gate_key) as gate:
        status, body = get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")
        assert status == 200, body
        status, nar = get(gate.url, f"/{syn.nar_url}")  # streamed from the bucket
        assert status == 200 and nar == syn.nar_data
        status, body = get(gate.url, f"/realisations/{syn.ca_id}.doi")
        assert status == 200, body
        assert realisation.parse_doi_v1(body).out_path == basename(syn.ca_out)
        status, body = get(gate.url, f"/build-trace-v2/{basename(syn.ca_drv)}/out.doi")
        assert status == 200, body  # the Nix 2.35 layout: asked of the bucket too
        assert json.loads(body)["outPath"] == basename(syn.ca_out)
        assert gate.refusals() == []


def test_gate_refuses_tampered_trace_in_bucket(
    seaweed: Seaweed, buckets: tuple[Synthetic, str, str], anonymous_env: dict[str, str],
    tmp_path: Path
) -> None:
    syn, traces_url, cache_url = buckets
    for trace in (syn.traces / "traces").iterdir():
        if not trace.name.startswith("."):
            tamper_trace_file(trace)
    bucket = traces_url.split("?")[0].removeprefix("s3://")
    upload_tree(seaweed.client(bucket), syn.traces)  # the tampered files replace the good
    policy = s3_policy(tmp_path / "policy.toml", traces_url)
    with running_gate(policy, [cache_url], str(syn.root), tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 404
        assert get(gate.url, f"/realisations/{syn.ca_id}.doi")[0] == 404
        reasons = {e["name"]: str(e["reason"]) for e in gate.refusals()}
    assert "bad signature" in reasons["hello"] and "bad signature" in reasons["hello-ca"]


@pytest.mark.parametrize("which", ["traces", "cache"])
def test_unreadable_bucket_is_502(seaweed: Seaweed, buckets: tuple[Synthetic, str, str],
                                  anonymous_env: dict[str, str], tmp_path: Path,
                                  which: str) -> None:
    """A bucket that does not exist (a typo, a deleted bucket): 502, logged as a fault."""
    syn, traces_url, cache_url = buckets
    missing = seaweed.url("no-such-bucket-x")
    policy = s3_policy(tmp_path / "policy.toml", missing if which == "traces" else traces_url)
    upstream = missing if which == "cache" else cache_url
    with running_gate(policy, [upstream], str(syn.root), tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 502
        assert get(gate.url, f"/realisations/{syn.ca_id}.doi")[0] == 502
        assert gate.refusals() == []
        assert all(e["outcome"] != "allowed" for e in gate.events())


def test_wrong_secret_is_a_fault_to_readers(
    seaweed: Seaweed, buckets: tuple[Synthetic, str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Readers with a wrong secret: the gate answers 502 (never 404, never 200) and
    ``tracehook verify`` exits 3 naming the rejection; the secret appears nowhere."""
    from tracehook import cli

    syn, traces_url, cache_url = buckets
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "BUILDERAACCESS0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-wrong-secret-value")
    policy = s3_policy(tmp_path / "policy.toml", traces_url)
    with running_gate(policy, [cache_url], str(syn.root), tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 502
        assert gate.refusals() == []
        log = (tmp_path / "gate.log").read_text()
    assert "SignatureDoesNotMatch" in log and "a-wrong-secret-value" not in log
    code = cli.main(["verify", syn.ia_drv, "--policy", str(policy), "--store", str(syn.root)])
    out = capsys.readouterr()
    assert code == 3, out
    assert "SignatureDoesNotMatch" in out.out + out.err
    assert "a-wrong-secret-value" not in out.out + out.err
