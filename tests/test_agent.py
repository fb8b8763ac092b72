"""The signing agent and the hook's client side of it (no Nix: failure paths, protocol)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tracehook.errors import EnvironmentFault
from tracehook.signer import agent_client
from tracehook.signer.agent import SigningAgent, parse_request


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("plain", id="plain"),
        pytest.param('quote " and back\\slash', id="quote and backslash"),
        pytest.param("new\nline\ttab\r\x00\x1f\x7f", id="control characters"),
        pytest.param("ünïcödé ✓ 雪 🎉", id="non-ASCII and astral"),
        pytest.param("store = /tmp/r\nsecret-key-files = /a /b\n", id="nix config"),
    ],
)
def test_request_is_json(text: str) -> None:
    data = agent_client.request({"DRV_PATH": text, "OUT_PATHS": "", "NIX_CONFIG": text})
    assert data.endswith(b"\n")
    assert json.loads(data) == {"DRV_PATH": text, "OUT_PATHS": "", "NIX_CONFIG": text}
    assert parse_request(data)["DRV_PATH"] == text


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[1]\n", id="not an object"),
        pytest.param(b'{"OUT_PATHS": ""}\n', id="no DRV_PATH"),
        pytest.param(b'{"DRV_PATH": "x", "TRACEHOOK_CONFIG": "/evil"}\n', id="extra variable"),
        pytest.param(b'{"DRV_PATH": 1}\n', id="not a string"),
        pytest.param(b"{\n", id="truncated"),
    ],
)
def test_malformed_requests_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_request(data)


def talk(path: Path, payload: bytes) -> bytes:
    reply = agent_client.ask_agent(str(path), payload)
    assert reply is not None
    return reply


def test_agent_answers_with_hook_result(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    config = tmp_path / "none.toml"  # missing config: the hook's usual one-line failure
    with SigningAgent(sock, {"TRACEHOOK_CONFIG": str(config)}):
        assert (sock.stat().st_mode & 0o777) == 0o600
        reply = talk(sock, agent_client.request({"DRV_PATH": "/nix/store/x.drv"}))
        code, _, text = reply.partition(b"\n")
        assert code == b"0" and b"no signer configuration" in text
        strict = SigningAgent(tmp_path / "b.sock",
                              {"TRACEHOOK_CONFIG": str(config), "TRACEHOOK_STRICT": "1"})
        with strict:
            reply = talk(tmp_path / "b.sock", agent_client.request({"DRV_PATH": "/x.drv"}))
            assert reply.startswith(b"2\n")
        reply = talk(sock, b'{"DRV_PATH": "x", "TRACEHOOK_CONFIG": "/evil"}\n')
        assert reply.startswith(b"1\n") and b"malformed request" in reply
    assert not sock.exists()


def test_no_agent_means_fallback(tmp_path: Path) -> None:
    assert agent_client.ask_agent(str(tmp_path / "missing.sock"), b"{}\n") is None


def test_stale_socket_replaced_live_one_refused(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    with SigningAgent(sock, {}), pytest.raises(EnvironmentFault, match="already listens"):
        SigningAgent(sock, {}).start()
