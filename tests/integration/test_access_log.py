"""The access log: one line per closed TCP connection and per ended UDP session.

Each line carries the real client address (from a trusted PROXY header when there was one),
the service, the upstream, bytes both ways, the duration and why it ended.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
from pathlib import Path

import pytest

from edgeward.codec import build_proxy_v1
from support import (
    EdgeProcess,
    ThreadServer,
    UdpEcho,
    echo_handler,
    free_port,
    wait_until,
    whole_lines,
)


def logfmt(line: str) -> dict[str, str]:
    """`2026-... tcp k=v k="v w"` → {"time": ..., "kind": ..., k: v}."""
    parts = shlex.split(line)
    return {"time": parts[0], "kind": parts[1], **dict(p.split("=", 1) for p in parts[2:])}


def read_entries(path: Path, fmt: str, clients: list[str], timeout: float = 5.0) -> dict[str, dict[str, str]]:
    """The access-log entries by client address, once every one of `clients` has one."""
    entries: dict[str, dict[str, str]] = {}

    def enough() -> bool:
        lines = whole_lines(path)
        entries.clear()
        for x in lines:
            p = json.loads(x) if fmt == "json" else logfmt(x)
            entries[str(p["client"])] = {k: str(v) for k, v in p.items()}
        return all(c in entries for c in clients)
    assert wait_until(enough, timeout), f"no line for some of {clients}: {entries}"
    return entries


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_line_per_closed_connection_and_ended_session(tmp_path: Path, fmt: str) -> None:
    up = ThreadServer(echo_handler())
    udp_up = UdpEcho()
    port, uport, admin = free_port(), free_port(), free_port()
    log_path = tmp_path / "access.log"
    e = EdgeProcess(tmp_path, f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"
access_log = "{log_path}"
access_log_format = "{fmt}"
[listeners.front]
bind = ["127.0.0.1:{port}"]
trusted_proxies = ["127.0.0.3/32"]
[listeners.media]
bind = ["udp/127.0.0.1:{uport}"]
udp_idle_timeout = "1s"
[services.echo]
listen = ["front"]
to = "127.0.0.1:{up.port}"
[services.media]
listen = ["media"]
to = "127.0.0.1:{udp_up.port}"
""", admin_port=admin, wait=[("127.0.0.1", port)])
    try:
        # 1. A direct client from 127.0.0.2: 5 bytes each way.
        with socket.socket() as c:
            c.bind(("127.0.0.2", 0))
            c.connect(("127.0.0.1", port))
            direct_port = c.getsockname()[1]
            c.sendall(b"hello")
            assert c.recv(5) == b"hello"
        # 2. Through a trusted proxy (127.0.0.3) speaking for 198.51.100.7:4242: 7 bytes each way.
        with socket.socket() as c:
            c.bind(("127.0.0.3", 0))
            c.connect(("127.0.0.1", port))
            c.sendall(build_proxy_v1(("198.51.100.7", 4242), ("203.0.113.1", 443)) + b"proxied")
            assert c.recv(7) == b"proxied"
        # 3. A UDP session of 2 datagrams from 127.0.0.4, ended by its idle timeout.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.4", 0))
            u.settimeout(3)
            udp_port = u.getsockname()[1]
            for d in (b"one", b"three"):
                u.sendto(d, ("127.0.0.1", uport))
                assert u.recv(100) == d
        # The edge's own probe of the port (the test waiting for it to open) is a line too.
        by_client = read_entries(log_path, fmt, [f"127.0.0.2:{direct_port}", "198.51.100.7:4242",
                                                 f"127.0.0.4:{udp_port}"], timeout=6)
        direct = by_client[f"127.0.0.2:{direct_port}"]
        assert direct["kind"] == "tcp" and direct["service"] == "echo" and direct["listener"] == "front"
        assert direct["upstream"] == f"127.0.0.1:{up.port}"
        assert int(direct["in"]) == 5 and int(direct["out"]) == 5 and direct["end"] == "done"
        assert 0 <= float(direct["duration"]) < 5
        assert "via" not in direct
        proxied = by_client["198.51.100.7:4242"]  # the address the trusted proxy spoke for, not 127.0.0.3
        assert proxied["via"] == "proxy" and proxied["service"] == "echo"
        assert int(proxied["in"]) == 7 and int(proxied["out"]) == 7
        udp = by_client[f"127.0.0.4:{udp_port}"]
        assert udp["kind"] == "udp" and udp["service"] == "media" and udp["listener"] == "media"
        assert udp["upstream"] == f"127.0.0.1:{udp_up.port}" and udp["end"] == "udp_idle"
        assert int(udp["in"]) == 8 and int(udp["out"]) == 8
        assert int(udp["datagrams_in"]) == 2 and int(udp["datagrams_out"]) == 2
        assert float(udp["duration"]) > 0.95  # at least its idle timeout (judged once a second, never early)
        # A refused client (no route for a PROXY header from an untrusted sender) is logged too.
        with socket.socket() as c:
            c.bind(("127.0.0.5", 0))
            c.connect(("127.0.0.1", port))
            refused_client = f"127.0.0.5:{c.getsockname()[1]}"
            c.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
            c.settimeout(3)
            with contextlib.suppress(ConnectionResetError):
                assert c.recv(10) == b""
        refused = read_entries(log_path, fmt, [refused_client])[refused_client]
        assert refused["end"] == "proxy_untrusted"
        assert refused["service"] == "-" and refused["upstream"] == "-"
    finally:
        e.stop()
        up.close()
        udp_up.close()


def test_sniffed_name_and_alpn_are_logged_and_sigusr1_reopens(tmp_path: Path) -> None:
    """logrotate moves the file and sends SIGUSR1: later lines go to a new file at the same path."""
    import os
    import signal

    from edgeward.codec.testing import build_client_hello

    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    log_path = tmp_path / "access.log"
    e = EdgeProcess(tmp_path, f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"
access_log = "{log_path}"
[listeners.tls]
bind = ["127.0.0.1:{port}"]
[services.cloud]
listen = ["tls"]
names = ["cloud.example.org"]
to = "127.0.0.1:{up.port}"
""", admin_port=admin, wait=[("127.0.0.1", port)])
    hello = build_client_hello(sni="cloud.example.org", alpn=["h2", "http/1.1"])

    def one_client(src: str) -> str:
        with socket.socket() as c:
            c.bind((src, 0))
            c.connect(("127.0.0.1", port))
            c.sendall(hello)
            got = b""
            while len(got) < len(hello):
                chunk = c.recv(65536)
                assert chunk
                got += chunk
            return f"{src}:{c.getsockname()[1]}"
    try:
        first = one_client("127.0.0.2")
        entry = read_entries(log_path, "text", [first])[first]
        assert entry["proto"] == "tls" and entry["name"] == "cloud.example.org" and entry["alpn"] == "h2,http/1.1"
        assert entry["service"] == "cloud" and entry["end"] == "done"
        rotated = tmp_path / "access.log.1"
        os.rename(log_path, rotated)
        e.signal(signal.SIGUSR1)
        assert wait_until(log_path.exists, 5), "SIGUSR1 did not reopen the access log"
        second = one_client("127.0.0.3")
        assert second in read_entries(log_path, "text", [second])
        assert second not in rotated.read_text()
        assert e.proc.poll() is None
    finally:
        e.stop()
        up.close()
