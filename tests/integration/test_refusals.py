"""What a refused client sees is deliberate (net/refusal.py): answered in its protocol, or reset.

A TLS client with no route for its name gets the unrecognized_name alert; an HTTP client gets
421; when no upstream answers, TLS internal_error and HTTP 503. Bans, limits and protocol
errors are reset.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from edgeward.codec.testing import build_client_hello
from support import EdgeProcess, ThreadServer, echo_handler, free_port


def dead_port() -> int:
    return free_port()  # nothing listens there


@pytest.fixture
def edge(tmp_path: Path):  # type: ignore[no-untyped-def]
    up = ThreadServer(echo_handler())
    port = free_port()
    e = EdgeProcess(tmp_path, f"""
[listeners.front]
bind = ["127.0.0.1:{port}"]
sniff_timeout = "1s"
[services.known]
listen = ["front"]
names = ["known.example.org"]
to = "127.0.0.1:{up.port}"
[services.down]
listen = ["front"]
names = ["down.example.org"]
to = "127.0.0.1:{dead_port()}"
""", wait=[("127.0.0.1", port)])
    try:
        yield e, port
    finally:
        e.stop()
        up.close()


def tls_error(port: int, name: str) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=name):
                return "handshake completed"
        except ssl.SSLError as err:
            return str(err)
        except OSError as err:
            return f"os error: {err}"


def http_status(port: int, host: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := c.recv(4096):
            data += chunk
        return data


def test_tls_and_http_clients_are_told_why(edge) -> None:  # type: ignore[no-untyped-def]
    e, port = edge
    assert "UNRECOGNIZED_NAME" in tls_error(port, "other.example.org").upper()
    assert "INTERNAL_ERROR" in tls_error(port, "down.example.org").upper()
    reply = http_status(port, "other.example.org")
    assert reply.startswith(b"HTTP/1.1 421 ") and b"Connection: close" in reply
    reply = http_status(port, "down.example.org")
    assert reply.startswith(b"HTTP/1.1 503 ")
    assert e.counter("refused", "front", "no_route") == 2
    assert e.counter("refused", "front", "upstream_unreachable") + e.counter("refused", "front", "no_server") == 2


def test_protocol_errors_and_stalls_are_reset(edge) -> None:  # type: ignore[no-untyped-def]
    _e, port = edge
    hello = build_client_hello("known.example.org", [])
    for data in (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", hello[:30]):  # untrusted PROXY; stalls past sniff_timeout
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(data)
            with pytest.raises(ConnectionResetError):
                c.recv(100)


def test_a_banned_client_is_reset_at_once(edge) -> None:  # type: ignore[no-untyped-def]
    e, port = edge
    code, _ = e.api("POST", "/ban", {"jail": "manual", "addr": "127.0.0.9"})
    assert code == 200
    with socket.socket() as c:
        c.bind(("127.0.0.9", 0))
        c.settimeout(5)
        with pytest.raises(ConnectionResetError):  # at connect already, or at the first read
            c.connect(("127.0.0.1", port))
            c.recv(100)
    assert e.counter("refused", "front", "banned") == 1
