"""Slow and half-open connections are cut off by deadlines, while a normal client is still served."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_support import ServerThread

from service.app import create_app
from service.bus import LocalBus
from service.server import uvicorn_config
from service.settings import Settings

HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 1.0, 1.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    settings = Settings(
        redis_url=None,
        auth="off",
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
        http_header_timeout_s=HEADER_TIMEOUT_S,
        http_body_timeout_s=BODY_TIMEOUT_S,
    )
    app = create_app(settings, bus=LocalBus(), run_worker=False)
    with ServerThread(app, uvicorn_config(app, settings, log_level="warning")) as running:
        yield running


def connect(server: ServerThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def closed_after(sock: socket.socket, trickle: bytes = b"", every_s: float = 0.2) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (trickling ``trickle`` a byte at a time), and what it said."""
    started, received = time.monotonic(), b""
    sock.settimeout(every_s)
    for position in range(10_000):
        if trickle:
            try:
                sock.sendall(trickle[position % len(trickle) : position % len(trickle) + 1])
            except OSError:
                break
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            if time.monotonic() - started > 15:
                break
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    return time.monotonic() - started, received


def test_a_client_trickling_its_headers_gets_408_at_the_header_deadline(server: ServerThread) -> None:
    sock = connect(server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    elapsed, said = closed_after(sock, trickle=b"X-Slow: y\r\n")
    assert HEADER_TIMEOUT_S - 0.1 <= elapsed < HEADER_TIMEOUT_S + 2, elapsed
    assert said.startswith(b"HTTP/1.1 408"), said[:80]


def test_a_connection_that_sends_nothing_is_closed(server: ServerThread) -> None:
    elapsed, _ = closed_after(connect(server))
    assert HEADER_TIMEOUT_S - 0.1 <= elapsed < HEADER_TIMEOUT_S + 2, elapsed


def test_a_body_sent_too_slowly_is_cut_off_at_the_body_deadline(server: ServerThread) -> None:
    sock = connect(server)
    sock.sendall(
        b"PUT /v1/streams/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    elapsed, said = closed_after(sock, trickle=b" ")
    assert BODY_TIMEOUT_S - 0.2 <= elapsed < BODY_TIMEOUT_S + 2, (
        elapsed
    )  # the body's deadline, not the headers'
    assert b" 200 " not in said


def test_keep_alive_requests_get_a_fresh_header_deadline_each(server: ServerThread) -> None:
    """Deadlines are per request: a keep-alive connection used for longer than the deadline lives on."""
    with httpx.Client(base_url=server.url, timeout=5) as client:
        started = time.monotonic()
        while time.monotonic() - started < HEADER_TIMEOUT_S + BODY_TIMEOUT_S:
            assert client.get("/healthz").status_code == 200
            time.sleep(0.3)


def test_hundreds_of_half_open_requests_do_not_block_a_normal_client(server: ServerThread) -> None:
    slow = []
    for _ in range(300):
        sock = connect(server)
        sock.sendall(b"POST /v1/streams/s/events HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    try:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            assert time.monotonic() - started < 1.0
        time.sleep(HEADER_TIMEOUT_S + 1.0)
        answered = 0
        for sock in slow:
            sock.settimeout(0.5)
            answered += sock.recv(4096).startswith(b"HTTP/1.1 408")
        assert answered == len(slow)  # every half-open request was answered 408 (and closed)
    finally:
        for sock in slow:
            sock.close()


def test_the_settings_reach_uvicorn(tmp_path: Path) -> None:
    settings = Settings(redis_url=None, auth="off", http_keep_alive_s=7, http_max_connections=99)
    config = uvicorn_config(object(), settings)
    assert config.timeout_keep_alive == 7 and config.limit_concurrency == 99
    assert config.http.header_timeout_s == settings.http_header_timeout_s
