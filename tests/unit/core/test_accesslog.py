"""The access log's lines (fields, formats) and its outputs, without an edge."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest

from edgeward.accesslog import AccessLog, format_json, format_text
from edgeward.events import ConnClosed, EventBus, Peer, UdpSessionEnded


def test_a_sniffed_connection_line_carries_protocol_name_and_alpn() -> None:
    ev = ConnClosed("tls", Peer("203.0.113.5", 51234, True), "web", "10.0.0.2:443", 517, 3120, 0.1534, "done",
                    "tls", "cloud.example.org", "h2,http/1.1")
    text = format_text(0.0, ev)
    parts = dict(p.split("=", 1) for p in shlex.split(text)[2:])
    assert parts == {"client": "203.0.113.5:51234", "listener": "tls", "service": "web", "upstream": "10.0.0.2:443",
                     "in": "517", "out": "3120", "proto": "tls", "name": "cloud.example.org", "alpn": "h2,http/1.1",
                     "duration": "0.153", "end": "done", "via": "proxy"}
    doc = json.loads(format_json(0.0, ev))
    assert doc["kind"] == "tcp" and doc["name"] == "cloud.example.org" and doc["time"] == "1970-01-01T00:00:00.000Z"


def test_an_unsniffed_connection_and_a_udp_session_have_no_sniff_fields() -> None:
    plain = ConnClosed("l", Peer("192.0.2.1", 1), "echo", "10.0.0.1:7", 1, 2, 0.0, "done")
    udp = UdpSessionEnded("m", Peer("192.0.2.1", 2), "media", "10.0.0.1:9", 3, 4, 1, 1, 1.0, "udp_idle")
    for ev in (plain, udp):
        assert "proto=" not in format_text(0.0, ev) and "name=" not in format_text(0.0, ev)


@pytest.mark.parametrize("where", ["stderr", "file"])
def test_lines_go_to_stderr_or_a_file_that_reopens(where: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "access.log"
    log = AccessLog("stderr" if where == "stderr" else str(path))
    bus = EventBus()
    log.attach(bus)
    try:
        bus.publish(ConnClosed("l", Peer("192.0.2.7", 1), "echo", "10.0.0.1:7", 1, 2, 0.0, "done"))
        if where == "file":
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and "192.0.2.7" not in (path.read_text() if path.exists() else ""):
                time.sleep(0.01)
            path.rename(tmp_path / "access.log.1")
            log.reopen()
            while time.monotonic() < deadline and not path.exists():
                time.sleep(0.01)
            assert path.exists(), "reopen did not make a new file at once"
            bus.publish(ConnClosed("l", Peer("192.0.2.8", 1), "echo", "10.0.0.1:7", 1, 2, 0.0, "done"))
    finally:
        log.close()
    if where == "stderr":
        assert "client=192.0.2.7:1" in capfd.readouterr().err
    else:
        assert "192.0.2.7" in (tmp_path / "access.log.1").read_text()
        assert "192.0.2.8" in path.read_text() and "192.0.2.7" not in path.read_text()
