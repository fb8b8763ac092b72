"""The gate over real HTTP on 127.0.0.1, without Nix: answers, refusals, bad requests,
broken and slow upstreams, concurrency, restarts. The store, traces and cache are made by
hand (tests/gatekit.py ``make_synthetic``): one input-addressed and one floating
content-addressed derivation, signed by builderA.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cacheserver import CacheState, serve_cache, sparse_file
from gatekit import (
    RunningGate,
    Synthetic,
    make_synthetic,
    running_gate,
    tamper_trace,
    write_gate_key,
    write_policy,
)
from tracehook.gate.front import HttpLimits
from tracehook.nix import narinfo, realisation
from tracehook.nix.storepath import basename, hash_part
from tracehook.stores.binarycache import FileUpstream, open_upstream
from tracehook.trace import crypto


@pytest.fixture
def syn(tmp_path: Path) -> Synthetic:
    return make_synthetic(tmp_path / "syn")


@pytest.fixture
def gate_key(tmp_path: Path) -> tuple[Path, str]:
    return write_gate_key(tmp_path)


@pytest.fixture
def gate(syn: Synthetic, gate_key: tuple[Path, str], tmp_path: Path) -> Iterator[RunningGate]:
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log", signing_key=gate_key[0]) as g:
        yield g


def get(url: str, path: str, method: str = "GET", headers: dict[str, str] | None = None,
        body: bytes | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def gate_public(gate_key: tuple[Path, str]) -> dict[str, crypto.PublicKey]:
    pk = crypto.parse_public_key(gate_key[1])
    return {pk.name: pk}


# ------------------------------------------------------------------------- answers


def test_cache_info(gate: RunningGate) -> None:
    status, body = get(gate.url, "/nix-cache-info")
    assert status == 200
    assert b"StoreDir: /nix/store\n" in body and b"WantMassQuery: 1\n" in body
    assert b"Priority: " in body


def test_verified_ia_narinfo_is_resigned(gate: RunningGate, syn: Synthetic,
                                         gate_key: tuple[Path, str]) -> None:
    status, body = get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")
    assert status == 200, body
    ni = narinfo.parse(body.decode())
    assert ni.store_path == syn.ia_out
    assert len(ni.sigs) == 1
    assert crypto.nix_verify(gate_public(gate_key), narinfo.fingerprint(ni), ni.sigs[0])
    # A file upstream's NAR is named by its own file:// URL (--nar-urls direct, the
    # default): Nix reads it there and checks it against the NarHash the gate signed.
    assert ni.url is not None and ni.url.startswith(f"file://{syn.cache}/nar/")
    assert Path(urllib.parse.unquote(ni.url.removeprefix("file://"))).read_bytes() == \
        syn.nar_data
    status, nar = get(gate.url, "/" + ni.url.removeprefix(f"file://{syn.cache}/"))
    assert status == 200 and nar == syn.nar_data  # the gate still serves it too
    allowed = [e for e in gate.events() if e["outcome"] == "allowed"]
    assert allowed and allowed[0]["drv"] == syn.ia_drv


def test_nar_urls_gate_names_nars_the_gate_serves(syn: Synthetic, gate_key: tuple[Path, str],
                                                  tmp_path: Path) -> None:
    """``--nar-urls gate``: the narinfo's URL is relative; the gate streams the NAR."""
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log", signing_key=gate_key[0],
                      direct_nars=False) as gate:
        status, body = get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")
        assert status == 200, body
        ni = narinfo.parse(body.decode())
        assert ni.url is not None and ni.url.startswith("nar/")
        status, nar = get(gate.url, f"/{ni.url}")
        assert status == 200 and nar == syn.nar_data


def test_direct_nar_url_is_quoted(tmp_path: Path, gate_key: tuple[Path, str]) -> None:
    """A cache directory whose path needs quoting in a URL (a space, a "%") gets a
    file:// URL that names exactly that file."""
    syn = make_synthetic(tmp_path / "a dir 100%")
    with running_gate(syn.policy, [f"file://{urllib.parse.quote(str(syn.cache))}"],
                      str(syn.root), tmp_path / "gate.log", signing_key=gate_key[0]) as gate:
        status, body = get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")
        assert status == 200, body
        url = narinfo.parse(body.decode()).url
        assert url is not None and " " not in url and "%25" in url
        parsed = urllib.parse.urlparse(url)
        assert parsed.scheme == "file" and not parsed.netloc
        assert Path(urllib.parse.unquote(parsed.path)).read_bytes() == syn.nar_data


def test_verified_ca_realisation_both_layouts(gate: RunningGate, syn: Synthetic,
                                              gate_key: tuple[Path, str]) -> None:
    status, body = get(gate.url, f"/realisations/{syn.ca_id}.doi")
    assert status == 200, body
    r = realisation.parse_doi_v1(body)
    assert (r.id, r.out_path) == (syn.ca_id, basename(syn.ca_out))
    assert crypto.nix_verify(gate_public(gate_key), realisation.fingerprint_v1(r),
                             r.signatures[0])
    status, body = get(gate.url, f"/build-trace-v2/{basename(syn.ca_drv)}/out.doi")
    assert status == 200, body
    v2 = json.loads(body)
    assert v2["outPath"] == basename(syn.ca_out)
    assert v2["signatures"][0]["keyName"] == "gate-1"
    # Its narinfo is answered too, now that the gate knows the verified CA path.
    status, _ = get(gate.url, f"/{hash_part(syn.ca_out)}.narinfo")
    assert status == 200


def test_file_upstream_names_a_nar_by_its_file_url(tmp_path: Path) -> None:
    """The URL a gate hands Nix for a file upstream's NAR (--nar-urls direct): quoted, under
    the upstream's own directory, never for an unsafe relative path."""
    root = tmp_path / "a cache 100%"
    root.mkdir()
    up = open_upstream(f"file://{urllib.parse.quote(str(root))}")
    assert isinstance(up, FileUpstream)
    url = up.file_url("nar/0abc.nar.xz")
    assert url == "file://" + urllib.parse.quote(str(root)) + "/nar/0abc.nar.xz"
    assert url is not None and urllib.parse.unquote(url.removeprefix("file://")) == \
        f"{root}/nar/0abc.nar.xz"
    with pytest.raises(ValueError):
        up.file_url("nar/../../etc/passwd")
    assert FileUpstream("file:rel", Path("rel")).file_url("nar/x.nar") is None
    # the characters a cache path may hold that quoting changes (a path without them is
    # its own quoted form, and is not quoted)
    for rel in ("nar/a+b.nar", "nar/a:b=c!.nar", "n+ar/x.nar", "nar/plain-1_2.nar.zst"):
        assert up.file_url(rel) == ("file://" + urllib.parse.quote(str(root)) + "/"
                                    + urllib.parse.quote(rel, safe="/"))


def test_unknown_paths_and_ids_are_404(gate: RunningGate) -> None:
    assert get(gate.url, "/" + "0" * 32 + ".narinfo")[0] == 404
    assert get(gate.url, "/realisations/sha256:" + "ab" * 32 + "!out.doi")[0] == 404
    assert get(gate.url, "/build-trace-v2/" + "0" * 32 + "-x.drv/out.doi")[0] == 404
    assert get(gate.url, "/nar/" + "0" * 52 + ".nar.xz")[0] == 404
    assert get(gate.url, "/log/whatever")[0] == 404
    refusals = gate.refusals()
    assert {e["request"] for e in refusals} == {"realisation"}  # narinfo probes: no noise


# -------------------------------------------------------------------------- refusals


def test_tampered_trace_refuses_with_reason(syn: Synthetic, tmp_path: Path) -> None:
    for key_file in (syn.traces / "traces").iterdir():
        if not key_file.name.startswith("."):
            tamper_trace(syn.traces, key_file.name)
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 404
        assert get(gate.url, f"/realisations/{syn.ca_id}.doi")[0] == 404
        reasons = {e["name"]: e["reason"] for e in gate.refusals()}
    assert "bad signature" in str(reasons["hello"])
    assert "bad signature" in str(reasons["hello-ca"])
    line = json.loads((tmp_path / "gate.log").read_text().splitlines()[0])
    assert {"time", "event", "drv", "name", "outcome", "reason"} <= set(line)


def test_narinfo_with_other_nar_hash_is_refused(syn: Synthetic, tmp_path: Path) -> None:
    file = syn.cache / f"{hash_part(syn.ia_out)}.narinfo"
    ni = narinfo.parse(file.read_text())
    forged = narinfo.NarInfo(ni.store_path, "sha256:" + "1" * 52, ni.nar_size, ni.url)
    file.write_text(narinfo.render(forged))
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 404
        assert "trusted traces attest" in str(gate.refusals()[0]["reason"])


def test_trace_store_change_is_seen_without_restart(syn: Synthetic, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    (syn.traces / "traces").rename(saved)
    (syn.traces / "traces").mkdir()
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        path = f"/{hash_part(syn.ia_out)}.narinfo"
        assert get(gate.url, path)[0] == 404
        for f in saved.iterdir():
            f.rename(syn.traces / "traces" / f.name)
        time.sleep(0.3)  # the gate looks at the trace stores' state at most every 0.25 s
        assert get(gate.url, path)[0] == 200  # the trace store's state changed: re-decided


def test_restart_keeps_answering(syn: Synthetic, tmp_path: Path) -> None:
    """Nothing that matters lives only in memory: a new gate decides the same, including
    a content-addressed narinfo it has not seen a realisation for (found via Deriver)."""
    ca = syn.cache / f"{hash_part(syn.ca_out)}.narinfo"
    ca.write_text(ca.read_text() + f"Deriver: {basename(syn.ca_drv)}\n")
    for _ in range(2):
        with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                          tmp_path / "gate.log") as gate:
            assert get(gate.url, f"/{hash_part(syn.ca_out)}.narinfo")[0] == 200
            assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 200


def test_new_derivations_are_indexed_incrementally(syn: Synthetic, tmp_path: Path) -> None:
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 200
        more = make_synthetic(tmp_path / "more", tag="-2")
        for f in (more.root / "nix/store").iterdir():
            f.rename(syn.root / "nix/store" / f.name)
        for f in (more.traces / "traces").iterdir():
            if not f.name.startswith("."):
                f.rename(syn.traces / "traces" / f.name)
        for f in more.cache.rglob("*.nar*"):
            dest = syn.cache / f.relative_to(more.cache)
            dest.parent.mkdir(exist_ok=True)
            f.rename(dest)
        assert get(gate.url, f"/realisations/{more.ca_id}.doi")[0] == 200
        assert get(gate.url, f"/{hash_part(more.ia_out)}.narinfo")[0] == 200


def test_two_of_two_needs_both(syn: Synthetic, tmp_path: Path) -> None:
    write_policy(syn.policy, syn.traces, '{ threshold = 2, of = ["builderA", "builderB"] }',
                 ["builderA", "builderB"])
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 404
        assert "threshold" in str(gate.refusals()[0]["reason"])


# ----------------------------------------------------------------------- bad requests

BAD = [
    ("dotdot", "/../../etc/passwd"),
    ("nar-dotdot", "/nar/../../etc/passwd"),
    ("encoded-dotdot", "/nar/%2e%2e/%2e%2e/etc/passwd"),
    ("encoded-slash", "/nar/..%2f..%2fetc%2fpasswd"),
    ("double-slash", "//etc/passwd"),
    ("backslash", "/nar/..\\..\\x.nar"),
    ("nul", "/nix-cache-info%00"),
    ("short-narinfo", "/abc.narinfo"),
    ("upper-narinfo", "/" + "A" * 32 + ".narinfo"),
    ("bad-id-hex", "/realisations/sha256:zz!out.doi"),
    ("bad-id-output", "/realisations/sha256:" + "ab" * 32 + "!..%2fx.doi"),
    ("bad-id-no-output", "/realisations/sha256:" + "ab" * 32 + "!.doi"),
    ("v2-not-drv", "/build-trace-v2/" + "0" * 32 + "-x/out.doi"),
    ("v2-traversal", "/build-trace-v2/../out.doi"),
    ("v2-deep", "/build-trace-v2/" + "0" * 32 + "-x.drv/a/out.doi"),
    ("nar-name", "/nar/passwd"),
    ("bad-percent", "/nar/%ff%fe.nar"),
]


@pytest.mark.parametrize("path", [p for _, p in BAD], ids=[n for n, _ in BAD])
def test_bad_requests_are_400(gate: RunningGate, path: str) -> None:
    status, _ = get(gate.url, path)
    assert status in (400, 404), status
    assert status != 200


def test_methods_bodies_and_huge_lines(gate: RunningGate) -> None:
    assert get(gate.url, "/nix-cache-info", method="POST", body=b"x",
               headers={"Content-Length": "1"})[0] == 405
    assert get(gate.url, "/nix-cache-info", method="PUT")[0] == 405
    assert get(gate.url, "/nix-cache-info", headers={"Content-Length": "100000000"})[0] == 413
    assert get(gate.url, "/" + "a" * 20000)[0] == 414
    many = {f"X-H{i}": "v" for i in range(80)}
    assert get(gate.url, "/nix-cache-info", headers=many)[0] == 431
    assert get(gate.url, "/nix-cache-info", method="HEAD")[0] == 200
    assert get(gate.url, "/nix-cache-info")[0] == 200  # still serving


def test_garbage_bytes_do_not_crash(gate: RunningGate) -> None:
    host, port = gate.url.removeprefix("http://").split(":")
    for junk in (b"\x00\xff\xfe garbage\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(junk)
            s.recv(1024)
    assert get(gate.url, "/nix-cache-info")[0] == 200


# ------------------------------------------------------------------- upstream faults


def test_slow_upstream_is_502_then_recovers(syn: Synthetic, tmp_path: Path) -> None:
    state = CacheState(delay=1.5)
    with serve_cache(syn.cache, state) as up, running_gate(
        syn.policy, [up.url], str(syn.root), tmp_path / "gate.log", upstream_timeout=0.5
    ) as gate:
        path = f"/{hash_part(syn.ia_out)}.narinfo"
        assert get(gate.url, path)[0] == 502
        assert get(gate.url, f"/realisations/{syn.ca_id}.doi")[0] == 502
        state.delay = 0
        assert get(gate.url, path)[0] == 200  # a fault is never cached
        assert [e["outcome"] for e in gate.events()].count("failed") == 2


@pytest.mark.parametrize("status", [500, 503, 302])
def test_failing_upstream_is_502_never_200(syn: Synthetic, tmp_path: Path, status: int) -> None:
    with serve_cache(syn.cache, CacheState(status=status)) as up, running_gate(
        syn.policy, [up.url], str(syn.root), tmp_path / "gate.log"
    ) as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 502
        assert get(gate.url, f"/realisations/{syn.ca_id}.doi")[0] == 502
        assert get(gate.url, f"/{syn.nar_url}")[0] == 502


def test_unreachable_upstream_and_fallback_to_second(syn: Synthetic, tmp_path: Path) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    with running_gate(syn.policy, [dead_url], str(syn.root), tmp_path / "a.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 502
    with running_gate(syn.policy, [dead_url, f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "b.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 200


def test_malformed_upstream_narinfo_is_refused(syn: Synthetic, tmp_path: Path) -> None:
    (syn.cache / f"{hash_part(syn.ia_out)}.narinfo").write_bytes(b"\xff\x00 not a narinfo")
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 404
        assert "malformed narinfo" in str(gate.refusals()[0]["reason"])


def test_unreadable_trace_store_is_502(syn: Synthetic, tmp_path: Path) -> None:
    write_policy(syn.policy, syn.traces, '"builderA"', ["builderA"])
    text = syn.policy.read_text().replace(f"file://{syn.traces}", "http://127.0.0.1:9")
    syn.policy.write_text(text)
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 502
        assert get(gate.url, f"/realisations/{syn.ca_id}.doi")[0] == 502


# ----------------------------------------------------------------------------- NARs


def test_nar_streams_through_http_upstream(syn: Synthetic, tmp_path: Path) -> None:
    big = sparse_file(syn.cache / "nar" / ("1" * 52 + ".nar"), 64 * 1024 * 1024)
    with serve_cache(syn.cache) as up, running_gate(
        syn.policy, [up.url], str(syn.root), tmp_path / "gate.log"
    ) as gate:
        status, body = get(gate.url, "/nar/" + big.name)
        assert status == 200 and len(body) == 64 * 1024 * 1024
        assert hashlib.sha256(body).digest() == hashlib.sha256(bytes(len(body))).digest()


def test_a_bug_in_a_worker_closes_its_connection_and_the_gate_goes_on(
        gate: RunningGate, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NAR is streamed by a worker thread: a bug there cuts that connection off (never a
    connection left waiting for ever), and every other request is still answered."""
    import tracehook.gate.front as front

    big = sparse_file(Path(gate.server.service.upstreams[0].url.removeprefix("file://"))
                      / "nar" / ("3" * 52 + ".nar"), 1024 * 1024)

    def broken(*args: object) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(front, "_stream", broken)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        get(gate.url, "/nar/" + big.name)
    assert get(gate.url, "/nix-cache-info")[0] == 200


def test_nar_broken_off_upstream_gives_short_body(syn: Synthetic, tmp_path: Path) -> None:
    big = sparse_file(syn.cache / "nar" / ("2" * 52 + ".nar"), 8 * 1024 * 1024)
    with serve_cache(syn.cache, CacheState(break_after=1024 * 1024)) as up, running_gate(
        syn.policy, [up.url], str(syn.root), tmp_path / "gate.log"
    ) as gate:
        with pytest.raises(http.client.IncompleteRead):
            get(gate.url, "/nar/" + big.name)
        assert get(gate.url, "/nix-cache-info")[0] == 200


# ---------------------------------------------------------------------- concurrency


def test_many_concurrent_clients_one_decision(gate: RunningGate, syn: Synthetic) -> None:
    paths = [f"/{hash_part(syn.ia_out)}.narinfo", f"/realisations/{syn.ca_id}.doi",
             "/" + "0" * 32 + ".narinfo", "/nix-cache-info"]

    def client(i: int) -> list[tuple[str, int, bytes]]:
        return [(p, *get(gate.url, p)) for p in paths for _ in range(5)]

    with ThreadPoolExecutor(64) as pool:
        results = [r for rs in pool.map(client, range(64)) for r in rs]
    by_path: dict[str, set[tuple[int, bytes]]] = {}
    for p, status, body in results:
        by_path.setdefault(p, set()).add((status, body))
    assert [s for s, _ in by_path[paths[0]]] == [200]
    assert [s for s, _ in by_path[paths[1]]] == [200]
    assert [s for s, _ in by_path[paths[2]]] == [404]
    verifier = gate.server.service.verifier
    assert verifier.generation()[1] == 1  # one verification state for every request
    planned = verifier.steps_planned
    assert 0 < planned <= 6  # each step of the closures once, not once per request


def test_slow_clients_do_not_block_others(syn: Synthetic, tmp_path: Path) -> None:
    """Connections that never finish their request head, and idle ones, hold no slot a new
    client needs: at the cap the longest-waiting one is closed to make room."""
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log",
                      http=HttpLimits(header_timeout=1.0, max_connections=8)) as gate:
        host, port = gate.url.removeprefix("http://").split(":")
        slow = [socket.create_connection((host, int(port))) for _ in range(8)]
        for s in slow:
            s.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n")  # never finished
        time.sleep(0.2)
        started = time.monotonic()
        for _ in range(4):
            assert get(gate.url, "/nix-cache-info")[0] == 200
        assert time.monotonic() - started < 1.0
        # The slow ones are dropped after the header deadline, whatever they still send.
        time.sleep(1.5)
        for s in slow:
            s.settimeout(2)
            with contextlib.suppress(OSError):
                s.sendall(b"X-Late: 1\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(64) == b""  # closed: no answer to a request that came too late
            s.close()
        assert get(gate.url, "/nix-cache-info")[0] == 200


def test_idle_keep_alive_connection_is_closed_after_the_idle_limit(
        syn: Synthetic, tmp_path: Path) -> None:
    """A kept-alive connection that asks nothing for ``idle_timeout`` seconds is closed (the
    kernel's receive timeout, a fraction of a second here), one that keeps asking is not."""
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log", http=HttpLimits(idle_timeout=0.6)) as gate:
        host, port = gate.url.removeprefix("http://").split(":")
        busy = http.client.HTTPConnection(host, int(port), timeout=5)
        idle = socket.create_connection((host, int(port)))
        idle.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
        idle.settimeout(5)
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        for _ in range(6):  # 0.2 s apart: never idle for the limit
            busy.request("GET", "/nix-cache-info")
            resp = busy.getresponse()
            assert resp.status == 200
            resp.read()
            time.sleep(0.2)
        with contextlib.suppress(ConnectionResetError):
            assert idle.recv(64) == b""  # closed by the gate, without an answer
        assert 0.5 < time.monotonic() - started < 4.0
        busy.request("GET", "/nix-cache-info")
        assert busy.getresponse().status == 200
        busy.close()
        idle.close()


def test_keep_alive_connection_serves_many(gate: RunningGate, syn: Synthetic) -> None:
    host, port = gate.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    for _ in range(20):
        conn.request("GET", f"/{hash_part(syn.ia_out)}.narinfo")
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.close()


def test_pipelined_requests_are_answered_in_order(gate: RunningGate, syn: Synthetic) -> None:
    """Two requests sent at once on one connection: two answers, in the order asked."""
    host, port = gate.url.removeprefix("http://").split(":")
    first, second = f"/{hash_part(syn.ia_out)}.narinfo", "/nix-cache-info"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {first} HTTP/1.1\r\nHost: x\r\n\r\n"
                     f"GET {second} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     .encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    heads = [part for part in data.split(b"HTTP/1.1 ")[1:]]
    assert [h[:3] for h in heads] == [b"200", b"200"]
    assert b"StorePath: " + syn.ia_out.encode() in heads[0]
    assert b"StoreDir: " in heads[1]
    # thousands at once (read from one buffer, one after the other, not by recursion)
    many = 3000
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n" * many
                     + b"GET /nix-cache-info HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(1 << 20):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == many + 1


def test_answers_at_hand_start_no_worker_and_a_bug_answers_500(
        gate: RunningGate, syn: Synthetic) -> None:
    """With file:// upstreams the front's loop answers what needs no waiting itself (no
    worker thread for answers already decided); a bug in a handler answers 500, closes that
    connection and leaves the gate serving."""
    path = f"/{hash_part(syn.ia_out)}.narinfo"
    assert get(gate.url, path)[0] == 200  # (decides the step: in a worker)
    workers = gate.server._workers
    before = workers._threads
    for _ in range(50):
        assert get(gate.url, path)[0] == 200
        assert get(gate.url, "/nix-cache-info")[0] == 200
    assert workers._threads == before
    routes = gate.server.routes
    original = routes.route

    def broken(target: str) -> object:
        if target == "/nix-cache-info":
            raise RuntimeError("a bug")
        return original(target)

    routes.route = broken  # type: ignore[method-assign,assignment]
    assert get(gate.url, "/nix-cache-info")[0] == 500
    assert get(gate.url, path)[0] == 200


class _AcceptFails:
    """The gate's listening socket, whose accept fails while ``failing`` (as it does when
    the process has no file descriptor left: EMFILE)."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failing = True
        self.calls = 0

    def accept(self) -> tuple[socket.socket, object]:
        self.calls += 1
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def test_out_of_descriptors_the_loop_waits_instead_of_spinning(
        gate: RunningGate, caplog: pytest.LogCaptureFixture) -> None:
    """When accept fails (no descriptor left), the connection stays in the backlog and the
    listening socket readable: the loop stops looking at it for a while (before, it tried
    again at once, at one core, with a warning each time), warns once, and accepts the
    waiting client when it can."""
    server = gate.server
    failing = _AcceptFails(server.socket)
    server.socket = failing  # type: ignore[assignment]
    port = int(gate.url.rsplit(":", 1)[1])
    with caplog.at_level(logging.INFO, logger="tracehook.gate.front"):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.6)
        assert 1 <= failing.calls <= 12  # about every 0.1 s, not thousands of times
        failing.failing = False
        data = client.recv(4096)
        client.close()
    assert data.startswith(b"HTTP/1.1 200 OK")
    warned = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(warned) == 1 and "Too many open files" in warned[0].getMessage()
    assert any("accepting connections again" in r.getMessage() for r in caplog.records)
    assert get(gate.url, "/nix-cache-info")[0] == 200


def test_single_flight_under_contention(syn: Synthetic, tmp_path: Path) -> None:
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        barrier = threading.Barrier(32)

        def client(_: int) -> int:
            barrier.wait()
            return get(gate.url, f"/realisations/{syn.ca_id}.doi")[0]

        with ThreadPoolExecutor(32) as pool:
            assert set(pool.map(client, range(32))) == {200}
        verifier = gate.server.service.verifier
        engine = verifier._engine
        assert engine is not None
        # 32 concurrent requests for one step: every step of its closure planned once
        assert verifier.steps_planned == len(engine.graph.heights)


# ------------------------------------------------------------------------ CLI and logs


def test_log_refused_reads_gate_log(syn: Synthetic, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from tracehook import cli

    (syn.traces / "traces").rename(tmp_path / "gone")
    (syn.traces / "traces").mkdir()  # a store that holds no trace (a missing one is a fault)
    log = tmp_path / "gate.log"
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root), log) as gate:
        assert get(gate.url, f"/realisations/{syn.ca_id}.doi")[0] == 404
    capsys.readouterr()
    assert cli.main(["log", "--refused", str(log)]) == 0
    out = capsys.readouterr().out
    assert "hello-ca" in out and "refused" in out and "no trace" in out


@pytest.mark.parametrize("argv, why", [
    (["--upstream", "file:///nonexistent-cache"], "not a directory"),
    ([], "at least one --upstream"),
    (["--upstream", "ftp://x"], "use file:///DIR"),
    (["--upstream", "file:///", "--listen", "127.0.0.1:notaport"], "HOST:PORT"),
    (["--upstream", "file:///", "--signing-key", "/nonexistent.key"], "key"),
])
def test_gate_cli_config_errors(syn: Synthetic, argv: list[str], why: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from tracehook import cli

    rc = cli.main(["gate", "--policy", str(syn.policy), "--listen", "127.0.0.1:0",
                   "--store", str(syn.root), *argv])
    assert rc == 2
    assert why in capsys.readouterr().err


def test_gate_console_script_serves_and_stops(syn: Synthetic, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    exe = Path(sys.executable).parent / "tracehook-gate"
    proc = subprocess.Popen([str(exe), "--policy", str(syn.policy), "--upstream",
                             f"file://{syn.cache}", "--listen", f"127.0.0.1:{port}",
                             "--store", str(syn.root), "--log-file", str(tmp_path / "g.log")],
                            stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                if get(url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "gate did not start"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert b"serving on" in err and b"allowed" in err


def test_broken_local_derivation_is_skipped(syn: Synthetic, tmp_path: Path) -> None:
    junk = syn.root / "nix/store" / ("0" * 32 + "-junk.drv")
    junk.write_text("Derive([this is not an ATerm")
    with running_gate(syn.policy, [f"file://{syn.cache}"], str(syn.root),
                      tmp_path / "gate.log") as gate:
        assert get(gate.url, f"/{hash_part(syn.ia_out)}.narinfo")[0] == 200
        assert get(gate.url, "/build-trace-v2/" + junk.name + "/out.doi")[0] == 404
        assert gate.server.service.index.skipped
