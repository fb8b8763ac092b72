"""The one HTTP client: deadlines, size limits, keep-alive, and the fault mapping."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tracehook.errors import ConfigError, Unreachable
from tracehook.stores.deadline import Watchdog
from tracehook.stores.http import Endpoint, HttpClient, status_kind


@contextlib.contextmanager
def raw_server(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP server on 127.0.0.1 that runs ``handle`` for each connection in a thread."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def loop() -> None:
        srv.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()

    def _serve(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            handle(conn)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        srv.close()
        t.join(1)


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def answer(body: bytes, keep: bool = True) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        while _read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s"
                         % (len(body), b"" if keep else b"Connection: close\r\n", body))
            if not keep:
                return
    return handle


def client(url: str, timeout: float = 2.0, deadline: float | None = None) -> HttpClient:
    return HttpClient(Endpoint.parse(url, "test URL"), timeout, deadline)


def test_trickling_server_is_cut_off_at_the_deadline() -> None:
    """One byte every 0.2 s never trips a per-recv timeout of 2 s; the deadline ends it."""
    def trickle(conn: socket.socket) -> None:
        _read_request(conn)
        for b in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
            conn.sendall(bytes([b]))
            time.sleep(0.2)

    with raw_server(trickle) as url:
        started = time.monotonic()
        with pytest.raises(Unreachable, match="no complete answer within 1 s"):
            client(url, timeout=2.0, deadline=1.0).request("GET", "/x")
        assert time.monotonic() - started < 1.8


def test_body_over_the_limit_is_a_fault_not_a_truncation() -> None:
    with raw_server(answer(b"y" * 5000)) as url:
        with pytest.raises(Unreachable, match="larger than 1000 bytes"):
            client(url).request("GET", "/x", limit=1000)
        assert client(url).request("GET", "/x", limit=5000).body == b"y" * 5000


def test_body_cut_short_is_a_fault() -> None:
    def short(conn: socket.socket) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")

    with raw_server(short) as url, pytest.raises(Unreachable):
        client(url).request("GET", "/x")


def test_keep_alive_connection_is_reused() -> None:
    connections = []

    def counting(conn: socket.socket) -> None:
        connections.append(conn)
        answer(b"ok")(conn)

    with raw_server(counting) as url:
        c = client(url)
        for _ in range(5):
            assert c.request("GET", "/x").body == b"ok"
        assert len(connections) == 1


def test_stale_pooled_connection_is_retried_once_for_get() -> None:
    """The server closes a kept-alive connection after one answer without saying so."""
    with raw_server(answer(b"ok", keep=True)) as url:
        c = client(url)
        assert c.request("GET", "/x").body == b"ok"

    def once(conn: socket.socket) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with raw_server(once) as url2:
        c2 = client(url2)
        assert c2.request("GET", "/x").body == b"ok"  # server then closes silently
        time.sleep(0.05)
        assert c2.request("GET", "/x").body == b"ok"  # stale conn: one fresh retry


def test_refused_connection_is_unreachable() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(Unreachable, match="unreachable"):
        client(f"http://127.0.0.1:{port}").request("GET", "/x")


@pytest.mark.parametrize(("url", "error"), [
    ("ftp://host/x", "expected http"),
    ("http://user:pw@host/x", "no credentials"),
    ("http://host:99999/", "out of range"),
    ("http:///x", "expected http"),
    ("http://host/x?a=b", "no query"),
])
def test_endpoint_parse_refuses(url: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        Endpoint.parse(url, "test URL")


def test_endpoint_target_quotes_and_keeps_prefix() -> None:
    ep = Endpoint.parse("http://[::1]:8080/cache/", "u")
    assert ep.url == "http://[::1]:8080/cache"
    assert ep.target("realisations/sha256:ab!out.doi") == "/cache/realisations/sha256:ab!out.doi"
    assert ep.target("a b") == "/cache/a%20b"


@pytest.mark.parametrize(("status", "absent", "kind"), [
    (200, (404,), "ok"), (204, (404,), "ok"), (404, (404,), "absent"),
    (403, (404,), "fault"), (403, (403, 404), "absent"), (412, (404,), "conflict"),
    (409, (404,), "conflict"), (500, (404,), "fault"), (301, (404,), "fault"),
])
def test_status_kind(status: int, absent: tuple[int, ...], kind: str) -> None:
    assert status_kind(status, absent) == kind


def test_watchdog_shuts_a_socket_down_at_its_deadline_and_not_before() -> None:
    dog = Watchdog()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        late = dog.watch(c, time.monotonic() + 60)  # the thread sleeps until this one
        start = time.monotonic()
        with dog.deadline(a, 0.3):  # an earlier deadline must wake it
            assert a.recv(1) == b""  # the shutdown ends the blocked read
        assert 0.25 <= time.monotonic() - start < 5
        dog.release(late)
        d.sendall(b"x")
        assert c.recv(1) == b"x"  # c was not shut down


def test_watchdog_is_not_woken_by_deadlines_after_its_next_look() -> None:
    dog = Watchdog()
    a, b = socket.socketpair()
    with a, b:
        with dog.deadline(a, 10):
            pass
        time.sleep(0.05)  # the thread has started and sleeps until its next look
        looks = dog.looks
        for _ in range(2_000):  # request after request, as a gate's front registers them
            with dog.deadline(a, 10):
                pass
        assert dog.looks - looks <= 2  # (at most its periodic looks), not one a request
        start = time.monotonic()
        with dog.deadline(a, 0.2):  # one before its next look still wakes it in time
            assert a.recv(1) == b""
        assert 0.15 <= time.monotonic() - start < 0.9


def test_watchdog_heap_stays_bounded_under_many_short_requests() -> None:
    dog = Watchdog()
    a, b = socket.socketpair()
    with a, b:
        for _ in range(20_000):
            with dog.deadline(a, 10):
                pass
        assert len(dog._heap) <= 2 * len(dog._live) + 1025
        a.sendall(b"x")
        assert b.recv(1) == b"x"  # nothing released was ever shut down
