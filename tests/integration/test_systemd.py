"""Under systemd: the notify socket (READY once serving, RELOADING/READY around reloads, STATUS=,
watchdog pings, STOPPING on SIGTERM), journald priorities on stderr, and the shipped unit file
checked by `systemd-analyze verify`. The test plays systemd's side: it binds $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeward.systemd import Notifier, watchdog_interval
from support import ThreadServer, echo_handler, free_port, require

ROOT = Path(__file__).resolve().parents[2]
EDGEWARD = [sys.executable, "-m", "edgeward.cli"]


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket collecting KEY=value messages."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path

    def next(self, timeout: float = 10.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    def until(self, key: str, timeout: float = 10.0) -> tuple[dict[str, str], list[dict[str, str]]]:
        """Messages up to the first that carries `key`: (that one, those before it)."""
        seen: list[dict[str, str]] = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            if key in msg:
                return msg, seen
            seen.append(msg)

    def close(self) -> None:
        self.sock.close()


def config(tmp: Path, port: int, admin: int, upstream: int) -> str:
    return f"""[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp / 'state'}"

[services.echo]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{upstream}"
"""


@pytest.fixture
def upstream() -> Iterator[ThreadServer]:
    s = ThreadServer(echo_handler())
    try:
        yield s
    finally:
        s.close()


def test_notify_ready_reload_status_watchdog_stopping(tmp_path: Path, upstream: ThreadServer) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    port, admin = free_port(), free_port()
    cfg = tmp_path / "edge.toml"
    cfg.write_text(config(tmp_path, port, admin, upstream.port))
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000")
    with open(tmp_path / "edge.log", "wb") as log:
        proc = subprocess.Popen([*EDGEWARD, "run", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        ready, _ = notify.until("READY", timeout=20)
        # READY means serving: the listener and the admin API answer at once.
        with socket.create_connection(("127.0.0.1", port), timeout=3) as c:
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
        socket.create_connection(("127.0.0.1", admin), timeout=3).close()
        assert ready["READY"] == "1" and "1 TCP and 0 UDP listeners" in ready["STATUS"]

        # Watchdog: pings every WATCHDOG_USEC / 2 (0.2 s), from the event loop.
        t0 = time.monotonic()
        pings = 0
        while time.monotonic() - t0 < 1.5:
            if notify.next(2.0).get("WATCHDOG") == "1":
                pings += 1
        assert 4 <= pings <= 10

        # A reload: RELOADING=1 (with the monotonic clock systemd 253+ checks), then READY=1.
        proc.send_signal(signal.SIGHUP)
        reloading, _ = notify.until("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        after, _ = notify.until("READY")
        assert "1 reloads" in after["STATUS"]
        # A rejected reload (a broken file) also ends with READY: the running config stays.
        cfg.write_text("[services.broken\n")
        proc.send_signal(signal.SIGHUP)
        notify.until("RELOADING")
        after, _ = notify.until("READY")
        assert "1 reloads" in after["STATUS"]

        proc.send_signal(signal.SIGTERM)
        notify.until("STOPPING")
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()


def test_log_lines_carry_journald_priorities_when_stderr_is_the_journal(tmp_path: Path,
                                                                        upstream: ThreadServer) -> None:
    port, admin = free_port(), free_port()
    cfg = tmp_path / "edge.toml"
    cfg.write_text(config(tmp_path, port, admin, upstream.port))
    with open(tmp_path / "stderr", "wb") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.Popen([*EDGEWARD, "run", str(cfg)], stdout=err, stderr=err, env=env)
    try:
        deadline = time.monotonic() + 20
        while b"edgeward started" not in (tmp_path / "stderr").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = (tmp_path / "stderr").read_text().splitlines()
    started = next(line for line in lines if "edgeward started" in line)
    assert started.startswith("<6>edgeward")  # info, no timestamp of our own (journald adds it)


def test_notifier_speaks_to_abstract_sockets_and_never_raises(tmp_path: Path) -> None:
    name = f"edgeward-test-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind("\0" + name)
    srv.settimeout(3)
    n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
    assert n is not None
    n.ready("all good")
    assert srv.recv(100) == b"READY=1\nSTATUS=all good"
    srv.close()
    assert n.send(status="gone") is False  # systemd went away: a warning, not an exception
    n.close()
    assert Notifier.from_env({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # another process's


def test_the_shipped_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require("systemd-analyze")
    unit = (ROOT / "contrib/systemd/edgeward.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    # The unit names /usr/local/bin/edgeward; verify checks that ExecStart exists, so point it here.
    (tmp_path / "edgeward.service").write_text(unit.replace("/usr/local/bin/edgeward", EDGEWARD_BIN))
    r = subprocess.run([analyze, "verify", str(tmp_path / "edgeward.service")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


EDGEWARD_BIN = str(Path(sys.executable).with_name("edgeward"))
