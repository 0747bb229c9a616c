"""A Local API that misbehaves (a scripted HTTP server on loopback standing in for one): garbage,
server errors, malformed decisions, no answer at all. Each is a clear error, counted, never a
crash or a busy loop; the good decisions of a partly bad answer are enforced; the data plane
keeps serving while a poll hangs; the protocol is the bouncer's (X-Api-Key, startup=true once,
then startup=false)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from support import EdgeProcess, ThreadServer, echo_handler, free_port, served, wait_until

POLL = 0.2
GOOD = {"id": 1, "type": "ban", "scope": "Ip", "value": "127.0.0.30", "duration": "1h",
        "scenario": "crowdsecurity/http-probing", "origin": "crowdsec"}


class FakeLapi:
    """Answers each poll with the next scripted (status, body, delay); then with empty streams."""

    def __init__(self) -> None:
        self.script: list[tuple[int, bytes, float]] = []
        self.requests: list[tuple[str, dict[str, list[str]], str | None]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                u = urlsplit(self.path)
                with fake.lock:
                    fake.requests.append((u.path, parse_qs(u.query), self.headers.get("X-Api-Key")))
                    status, body, delay = fake.script.pop(0) if fake.script else (200, b'{"new":null,"deleted":null}', 0.0)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def polls(self) -> int:
        with self.lock:
            return len(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeLapi]:
    f = FakeLapi()
    yield f
    f.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_bad_answers_are_counted_and_good_decisions_kept(tmp_path: Path, fake: FakeLapi) -> None:
    bad_item = dict(GOOD, value="not-an-address", id=2)
    fake.script = [
        (200, b"<html>maintenance</html>", 0.0),  # startup: not JSON
        (500, b'{"message":"database is locked"}', 0.0),
        (200, json.dumps({"new": [GOOD, bad_item, dict(GOOD, id=3, type="captcha", value="127.0.0.31")],
                          "deleted": None}).encode(), 0.0),
        (200, b'{"new": {"not": "a list"}}', 0.0),
        (200, b'{"new":null,"deleted":null}', 3.0),  # longer than timeout: no answer in time
    ]
    up = ThreadServer(echo_handler())
    port = free_port()
    edge = EdgeProcess(tmp_path, f"""
[services.app]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"

[guard.crowdsec]
lapi_url = "http://127.0.0.1:{fake.port}"
api_key = "k3y"
update_frequency = "{int(POLL * 1000)}ms"
max_backoff = "400ms"
timeout = "1s"
""", wait=[("127.0.0.1", port)])
    try:
        def cs() -> dict[str, object]:
            return edge.status()["guard"]["crowdsec"]  # type: ignore[index, return-value]

        assert wait_until(lambda: cs()["errors_by_kind"].get("timeout", 0) >= 1, 15), edge.log()  # type: ignore[attr-defined]
        # While a poll hangs, the data plane answers as ever.
        t0 = time.monotonic()
        assert served("127.0.0.32", port)
        assert time.monotonic() - t0 < 1.0
        st = cs()
        assert st["errors_by_kind"] == {"protocol": 2, "http": 1, "timeout": 1}, st
        assert st["invalid"] == 1 and st["other_type"] == 1 and st["decisions"] == 1
        assert not served("127.0.0.30", port)  # the good decision of the partly bad answer
        assert served("127.0.0.31", port)  # captcha: nothing to enforce at admit
        log = edge.log()
        assert "decision stream is not JSON" in log
        assert "answered 500 'database is locked'" in log
        assert "1 malformed decision(s) skipped: decision value 'not-an-address' is not an address" in log
        assert "no answer within 1s" in log
        # The protocol: the key in X-Api-Key, startup=true until a poll succeeded, then false.
        with fake.lock:
            reqs = list(fake.requests)
        assert all(p == "/v1/decisions/stream" and key == "k3y" for p, _q, key in reqs)
        startups = [q["startup"][0] for _p, q, _k in reqs]
        assert startups[:3] == ["true", "true", "true"] and set(startups[3:]) == {"false"}, startups
        # Recovered, polling at update_frequency again, and never spinning.
        assert wait_until(lambda: cs()["connected"] is True, 5)
        n0, c0 = fake.polls(), cpu_seconds(edge.pid)
        time.sleep(2.0)
        polls = fake.polls() - n0
        assert 2.0 / POLL / 2 <= polls <= 2.0 / POLL + 2, polls
        assert cpu_seconds(edge.pid) - c0 < 0.6
        assert edge.proc.poll() is None
    finally:
        edge.stop()
        up.close()


def edge_config(port: int, up: int, lapi_port: int) -> str:
    return f"""
[services.app]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up}"

[guard.crowdsec]
lapi_url = "http://127.0.0.1:{lapi_port}/"
api_key = "k3y"
update_frequency = "{int(POLL * 1000)}ms"
max_backoff = "400ms"
timeout = "1s"
"""


def test_snapshot_restored_then_reconciled_with_the_lapi(tmp_path: Path, fake: FakeLapi) -> None:
    """Decisions of the last run hold until the LAPI answers; its first answer is its whole state, so
    a restored decision it no longer has (flushed from its database) is lifted; an ended one is not
    restored; a snapshot of another LAPI is not used; a corrupt snapshot is an error, not a crash."""
    state = tmp_path / "state"
    state.mkdir()
    now = time.time()
    snap = state / "crowdsec-decisions.json"

    def row(key: str, until: float) -> dict[str, object]:
        return {"key": key, "id": 9, "scope": "Ip", "scenario": "old/run", "origin": "crowdsec",
                "start": now - 60, "until": until}

    snap.write_text(json.dumps({"lapi_url": f"http://127.0.0.1:{fake.port}/", "decisions": [
        row("127.0.0.50", now + 3600), row("127.0.0.51", now - 1), {"key": "nonsense"}]}))
    fake.script = [(500, b'{"message":"starting"}', 0.0)] * 3 + [
        (200, json.dumps({"new": [dict(GOOD, value="127.0.0.52")], "deleted": None}).encode(), 0.0)]
    up = ThreadServer(echo_handler())
    port = free_port()
    edge = EdgeProcess(tmp_path, edge_config(port, up.port, fake.port), wait=[("127.0.0.1", port)])
    try:
        st = edge.status()["guard"]["crowdsec"]  # type: ignore[index]
        assert st["restored"] == 1 and st["snapshot_errors"] == 1
        assert not served("127.0.0.50", port) and served("127.0.0.51", port)
        assert wait_until(lambda: served("127.0.0.50", port), 10), edge.log()
        assert not served("127.0.0.52", port)
        assert "1 decision(s) of the last run are no longer in the LAPI: lifted" in edge.log()
        # The snapshot now holds what the LAPI said.
        assert wait_until(lambda: [r["key"] for r in json.loads(snap.read_text())["decisions"]] == ["127.0.0.52"], 5)
    finally:
        edge.stop()

    # Another LAPI's snapshot is not used; a corrupt one is said and skipped.
    other = FakeLapi()
    try:
        for text, restored, errors in ((snap.read_text(), 0, 0), ("{not json", 0, 1)):
            snap.write_text(text)
            other.script = [(500, b"{}", 0.0)] * 50
            edge = EdgeProcess(tmp_path, edge_config(port, up.port, other.port), wait=[("127.0.0.1", port)])
            try:
                st = edge.status()["guard"]["crowdsec"]  # type: ignore[index]
                assert (st["restored"], st["snapshot_errors"]) == (restored, errors), edge.log()
                assert served("127.0.0.52", port)
            finally:
                edge.stop()
    finally:
        other.close()
        up.close()
