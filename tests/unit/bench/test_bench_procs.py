"""The process helpers: every process the harness starts is stopped by its PID."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
from bench.procs import (
    ProcessGroup,
    children,
    cpu_seconds,
    memory_kb,
    raise_nofile_limit,
    stop_pid,
    wait_port,
)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True


def test_stop_pid_stops_a_sleep(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        proc = group.start("sleep", ["sleep", "300"])
        assert proc.alive()
        assert stop_pid(proc.pid, timeout=5)
        assert _gone(proc.pid)


def test_stop_pid_of_a_finished_process_is_false(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        proc = group.start("true", ["true"])
        proc.popen.wait(timeout=10)
        assert stop_pid(proc.pid, timeout=1) is False


def test_sigterm_ignoring_process_is_killed(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        proc = group.start("stubborn", ["sh", "-c", "trap '' TERM; echo up; sleep 300"])
        deadline = time.monotonic() + 10
        while "up" not in (tmp_path / "stubborn.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        stop_pid(proc.pid, timeout=0.3)
        assert _gone(proc.pid)


def test_group_exit_stops_forked_children_too(tmp_path: Path) -> None:
    # Like the nginx master and its worker: the child must not outlive the stop.
    pidfile = tmp_path / "child.pid"
    with ProcessGroup(tmp_path) as group:
        proc = group.start("parent", ["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"])
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child = int(pidfile.read_text())
        assert child in children(proc.pid)
    assert _gone(proc.pid)
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _gone(child)
    assert group.procs == []


def test_group_stops_processes_on_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ProcessGroup(tmp_path) as group:
        proc = group.start("sleep", ["sleep", "300"])
        raise RuntimeError("benchmark blew up")
    assert _gone(proc.pid)


def test_wait_port_reports_a_dead_process(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        proc = group.start("fails", ["sh", "-c", "echo cannot bind >&2; exit 3"])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match="cannot bind"):
            wait_port(port, timeout=10, proc=proc)


def test_wait_port_sees_a_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        wait_port(s.getsockname()[1], timeout=5)


def test_accounting_of_this_process() -> None:
    me = [os.getpid()]
    assert cpu_seconds(me) > 0
    mem = memory_kb(me)
    assert mem["rss_kb"] > 1000 and mem["pss_kb"] > 0
    assert memory_kb([]) == {"rss_kb": 0, "pss_kb": 0}


def test_nofile_soft_limit_is_raised_to_hard() -> None:
    soft, hard = raise_nofile_limit()
    assert soft == hard or hard == -1 or sys.platform != "linux"
