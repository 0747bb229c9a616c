"""Faults around the edge: upstreams that die or go silent, a full disk under the ban store, a
log file deleted and recreated under a jail. The edge is observed from outside only.

Part of `make soak` too (the faults are the same size there).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import counters

from support import EdgeProcess, ThreadServer, free_port, wait_until

STREAMER = Path(__file__).resolve().parent / "streamer.py"


@contextlib.contextmanager
def streamer(port: int, *, read: bool = True) -> Iterator[subprocess.Popen[str]]:
    """An upstream process that streams to every client and reads what it sends (stopped by PID)."""
    argv = [sys.executable, str(STREAMER), str(port)] + ([] if read else ["--no-read"])
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and "READY" in p.stdout.readline()
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def _relay_edge(tmp: Path, up_port: int, extra: str = "") -> tuple[EdgeProcess, int]:
    port = free_port()
    e = EdgeProcess(tmp, f"""
[listeners.l]
bind = ["127.0.0.1:{port}"]
{extra}
[services.s]
listen = ["l"]
to = "127.0.0.1:{up_port}"
""")
    # No readiness probe through the listener: it would be relayed to the upstream too.
    assert wait_until(lambda: e.status()["listeners"] != [], 5)
    return e, port


class _Client:
    """One thread, so that what the client's reads see is not consumed by a concurrent send: it
    queues as much as the sockets on the way take, then reads the upstream's stream."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.got = 0
        self.ended: str | None = None
        self.sent = 0

    def fill(self, seconds: float) -> None:
        """Send until nothing more is taken for `seconds` (every buffer to the upstream is full)."""
        self.sock.setblocking(False)
        chunk = b"c" * 65536
        idle_since = t0 = time.monotonic()
        while time.monotonic() - idle_since < seconds and time.monotonic() - t0 < 3 and self.sent < 32 << 20:
            try:
                self.sent += self.sock.send(chunk)
                idle_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        self.sock.settimeout(10)

    def read_until(self, n: int) -> None:
        while self.got < n:
            d = self.sock.recv(65536)
            assert d, f"closed after {self.got} bytes"
            self.got += len(d)

    def read_to_end(self) -> str:
        try:
            while d := self.sock.recv(65536):
                self.got += len(d)
            self.ended = "FIN"
        except ConnectionResetError:
            self.ended = "RST"
        except TimeoutError:
            self.ended = "still open"
        self.sock.close()
        return self.ended


def _kill_upstream_mid_transfer(tmp: Path, n: int, *, upstream_reads: bool = True
                                ) -> tuple[EdgeProcess, list[str], dict[tuple[str, ...], int]]:
    up_port = free_port()
    with streamer(up_port, read=upstream_reads) as up:
        e, port = _relay_edge(tmp, up_port)
        clients = [_Client(port) for _ in range(n)]
        for c in clients:
            c.read_until(1 << 20)  # mid-transfer: a megabyte from the upstream and more coming
        for c in clients:
            c.fill(0.3 if not upstream_reads else 0.05)  # and the client's bytes on their way up
        time.sleep(0.5)  # nobody reads for a while: the upstream's stream fills the buffers too
        up.kill()  # kill -9: the kernel resets connections with unread data
        up.wait(5)
        time.sleep(0.3)
        ends = [c.read_to_end() for c in clients]
    assert wait_until(lambda: e.status()["connections"] == 0, 5)
    return e, ends, counters(e.status(), "closed")


def test_upstream_killed_mid_upload_client_sees_a_clean_close(tmp_path: Path) -> None:
    e, ends, _ = _kill_upstream_mid_transfer(tmp_path, 5, upstream_reads=False)
    try:
        print("client ends:", ends)
        assert ends == ["FIN"] * 5
        assert e.proc.poll() is None
    finally:
        e.stop()


def test_upstream_killed_mid_transfer_is_counted(tmp_path: Path) -> None:
    # The upstream dies with unread bytes, so its kernel resets the connections: the edge counts
    # each as upstream_reset (an upstream that closes cleanly mid-stream, FIN, is a normal close).
    e, _, closed = _kill_upstream_mid_transfer(tmp_path, 5, upstream_reads=False)
    try:
        print("closed counters:", closed)
        by_upstream = sum(v for k, v in closed.items() if "upstream" in k[-1])
        assert by_upstream == 5, closed
    finally:
        e.stop()


def test_silent_upstream_idle_timeout_fires(tmp_path: Path) -> None:
    release = threading.Event()
    up = ThreadServer(lambda c: release.wait(20))  # accepts, never reads or writes
    e, port = _relay_edge(tmp_path, up.port, 'idle_timeout = "2s"')
    try:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"hello?")
            assert c.recv(10) == b""  # closed by the edge, not by our 10 s timeout
        took = time.monotonic() - t0
        # idle is judged once a second, on a clock kept to the second: never before the timeout,
        # within a couple of the clock's steps after it
        assert 2.0 <= took < 5.5, took
        assert counters(e.status(), "closed").get(("l", "idle_timeout")) == 1
        assert up.accepted == 1
    finally:
        release.set()
        e.stop()
        up.close()


def test_upstream_that_never_accepts_connect_timeout_fires(tmp_path: Path) -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    # neither succeeds nor fails until the edge's connect timeout.
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    up_port = lst.getsockname()[1]
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", up_port))
        fillers.append(f)
    time.sleep(0.2)
    port = free_port()
    e = EdgeProcess(tmp_path, f"""
[services.s]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up_port}"
connect_timeout = "1s"
""")
    try:
        assert wait_until(lambda: e.status()["listeners"] != [], 5)
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"anyone?")
            try:
                assert c.recv(10) == b""
            except ConnectionResetError:
                pass
        took = time.monotonic() - t0
        assert 0.9 <= took < 3.5, took
        st = e.status()
        refused = counters(st, "refused")
        assert sum(v for k, v in refused.items() if k[-1] == "upstream_unreachable") == 1, refused
        assert sum(counters(st, "connect_failures").values()) >= 1
    finally:
        e.stop()
        for f in fillers:
            f.close()
        lst.close()


# ---------------------------------------------------------------------- disk full under the ban store
@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        msg = f"cannot mount a tmpfs (needs root): {p.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> Path:
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(fd)
    return filler


def _refused_from(src: str, port: int) -> bool:
    c = socket.socket()
    try:
        c.bind((src, 0))
        c.settimeout(3)
        c.connect(("127.0.0.1", port))
        c.sendall(b"ping")
        return c.recv(4) != b"ping"
    except OSError:
        return True
    finally:
        c.close()


def _disk_full_edge(tmp: Path) -> Iterator[tuple[EdgeProcess, int, Path]]:
    up = ThreadServer(lambda c: c.sendall(c.recv(4)))
    port, admin = free_port(), free_port()
    with small_tmpfs(tmp / "state", "1m") as state:
        e = EdgeProcess(tmp, f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{state}"
[services.s]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
""", admin_port=admin)
        try:
            yield e, port, state
        finally:
            e.stop()
            up.close()


@pytest.fixture
def disk_full_edge(tmp_path: Path) -> Iterator[tuple[EdgeProcess, int, Path]]:
    yield from _disk_full_edge(tmp_path)


def test_disk_full_ban_store_keeps_what_it_had(disk_full_edge: tuple[EdgeProcess, int, Path]) -> None:
    e, port, state = disk_full_edge
    for a in ("127.3.0.1", "127.3.0.2"):
        assert e.api("POST", "/ban", {"addr": a})[0] == 200
    filler = _fill(state)
    try:
        code, body = e.api("POST", "/ban", {"addr": "127.3.0.9"})
    except OSError as exc:  # no answer (a defect of its own, see the test below)
        code, body = 0, str(exc)
    print("ban with the disk full:", code, body)
    assert e.proc.poll() is None  # no crash
    assert _refused_from("127.3.0.1", port) and not _refused_from("127.0.0.1", port)
    e.stop()
    filler.unlink()
    db = state / "guard.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {r[0] for r in con.execute("SELECT address FROM bans")}
    assert {"127.3.0.1", "127.3.0.2"} <= stored


def test_disk_full_ban_is_enforced_in_memory_and_the_error_reported(
        disk_full_edge: tuple[EdgeProcess, int, Path]) -> None:
    e, port, state = disk_full_edge
    assert e.api("POST", "/ban", {"addr": "127.3.0.1"})[0] == 200
    _fill(state)
    try:
        code, body = e.api("POST", "/ban", {"addr": "127.3.0.9"})
    except OSError as exc:  # the admin API closed the connection without an answer
        code, body = 0, str(exc)
    print("ban with the disk full:", code, body)
    assert _refused_from("127.3.0.9", port), "ban not enforced in memory"
    assert code != 0 and "full" in str(body).lower(), (code, body)


# ---------------------------------------------------------------------- log deleted and recreated
def test_log_deleted_and_recreated_under_a_jail_loses_no_line(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    port = free_port()
    e = EdgeProcess(tmp_path, f"""
[services.s]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:9"
[jails.app]
logpath = ["{log}"]
failregex = ["^FAIL login from <HOST>$"]
datepattern = "{{NONE}}"
maxretry = 100000
findtime = "1h"
""")

    def jail() -> dict[str, object]:
        code, body = e.api("GET", "/guard?jail=app")
        assert code == 200, body
        return body["jails"][0]  # type: ignore[index, no-any-return]

    def lines() -> int:
        return int(jail()["counters"]["lines"])  # type: ignore[index]

    try:
        assert wait_until(lambda: jail()["sources"][0].get("inotify") is not None, 5)  # type: ignore[index]
        time.sleep(0.5)  # the follower is at the (empty) file's end
        with open(log, "a") as f:
            for i in range(50):
                f.write(f"FAIL login from 192.0.2.{i % 250 + 1}\n")
        assert wait_until(lambda: lines() == 50, 10), lines()
        log.unlink()
        time.sleep(0.3)
        with open(log, "w") as f:  # a new file under the same name; lines at once, then more
            for i in range(50):
                f.write(f"FAIL login from 198.51.100.{i % 250 + 1}\n")
            f.flush()
            time.sleep(0.5)
            for i in range(50):
                f.write(f"FAIL login from 203.0.113.{i % 250 + 1}\n")
        assert wait_until(lambda: lines() == 150, 10), jail()
        assert wait_until(lambda: jail()["counters"]["matches"] == 150, 5), jail()  # type: ignore[index]
        j = jail()
        print("jail after delete+recreate:", j["counters"], j["sources"])
        assert j["sources"][0]["rotations"] == 1  # type: ignore[index]
        assert e.proc.poll() is None
    finally:
        e.stop()
