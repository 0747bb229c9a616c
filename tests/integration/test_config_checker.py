"""`edgeward run` reads its config without pydantic: a checker process validates it (at start and
at each reload) and the daemon, and its workers, unpickle the result (src/edgeward/config_checker.py).

The edge runs as a subprocess; its processes are found by PID (/proc/PID/task/*/children) and what
they loaded is read from /proc/PID/maps (pydantic_core is a shared object: mapped once imported).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeward.config.loader import ConfigError
from edgeward.config_checker import load_checked, load_checked_async
from support import (
    EDGEWARD,
    EdgeProcess,
    ThreadServer,
    echo_handler,
    free_port,
    signal_bits,
    signal_mask,
    wait_until,
)
from support import proc as running


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def loaded_pydantic(pid: int) -> list[str]:
    """The pydantic files process `pid` has mapped (pydantic_core's .so once pydantic is imported)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if "pydantic" in line})


def service(port: int, upstream: int) -> str:
    return f'[services.echo]\nlisten = ["127.0.0.1:{port}"]\nto = "127.0.0.1:{upstream}"\n'


def edge_head(tmp: Path, admin: int, workers: int) -> str:
    return f'[edge]\nadmin = "127.0.0.1:{admin}"\nstate_dir = "{tmp / "state"}"\nworkers = {workers}\n'


@contextlib.contextmanager
def echo_edge(tmp: Path, workers: int = 1) -> Iterator[tuple[EdgeProcess, str, int, int]]:
    """A running edge with one echo service: (the edge, its config's [edge] head, the service's
    port, the upstream's port); stopped at the end."""
    admin, port = free_port(), free_port()
    with contextlib.closing(ThreadServer(echo_handler())) as up:
        head = edge_head(tmp, admin, workers)
        e = EdgeProcess(tmp, head + service(port, up.port), admin_port=admin, wait=[("127.0.0.1", port)])
        try:
            yield e, head, port, up.port
        finally:
            e.stop()


def answers(port: int) -> bool:
    """Whether the echo service on `port` echoes a line."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"ping\n")
        return c.recv(100) == b"ping\n"
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_the_daemon_and_its_workers_never_load_pydantic(tmp_path: Path, workers: int) -> None:
    port2 = free_port()
    with echo_edge(tmp_path, workers) as (e, head, port, up_port):
        if workers > 1:
            assert wait_until(lambda: e.status()["workers"]["alive"] == workers, 15), e.log()  # type: ignore[index]
        e.status()  # answered: the start is over (signal handlers installed)
        procs = [e.pid, *[c for c in children(e.pid) if " worker " in cmdline(c)]]
        assert len(procs) == 1 + (workers if workers > 1 else 0)
        for pid in procs:
            assert loaded_pydantic(pid) == [], cmdline(pid)

        # A reload by signal applies the new file (a second port), checked by the checker process.
        e.write_config(head + service(port, up_port) + service(port2, up_port).replace("echo", "echo2"))
        e.signal(signal.SIGHUP)
        assert wait_until(lambda: e.counter("reloads", "applied") == 1, 15), e.log()
        assert answers(port2)
        # A bad file is rejected by the API's reload, with the checker's problem at file:line:col.
        e.write_config(head + service(port, up_port) + "tiemout = 3\n")
        code, answer = e.api("POST", "/reload")
        assert (code, answer) == (422, {"applied": False})
        assert f"{e.config_path}:" in e.log() and "unknown option 'tiemout'" in e.log()
        assert e.counter("reloads", "rejected") == 1
        procs = [e.pid, *[c for c in children(e.pid) if " worker " in cmdline(c)]]
        for pid in procs:
            assert loaded_pydantic(pid) == [], cmdline(pid)


def fifo_config(tmp_path: Path) -> Path:
    """A config whose check hangs: it names a FIFO (no writer) as a file the checks read."""
    fifo = tmp_path / "password"
    os.mkfifo(fifo)
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'[edge]\nadmin = "127.0.0.1:{free_port()}"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[guard.share]\nredis = "redis://127.0.0.1:1/0"\npassword_file = "{fifo}"\n')
    return cfg


def test_a_checker_that_hangs_is_stopped_at_its_timeout(tmp_path: Path) -> None:
    cfg = fifo_config(tmp_path)
    before = set(children(os.getpid()))
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_checked(cfg, timeout=2)
    assert "the checker process did not finish within 2s" in str(e.value) and str(e.value).startswith(f"{cfg}:1:1: ")
    with pytest.raises(ConfigError) as e:
        asyncio.run(load_checked_async(cfg, timeout=2))
    assert "did not finish within 2s" in str(e.value)
    assert time.monotonic() - t0 < 30
    assert set(children(os.getpid())) <= before  # killed and reaped, both times


def test_a_checker_that_dies_is_said_and_the_daemon_does_not_start(tmp_path: Path) -> None:
    cfg = fifo_config(tmp_path)
    proc = subprocess.Popen([*EDGEWARD, "run", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: checking(proc.pid), 15)
        checker = next(c for c in children(proc.pid) if "config_checker" in cmdline(c))
        os.kill(checker, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 2
    assert f"{cfg}:1:1: the config could not be checked: the checker process was killed by SIGKILL" in err
    assert "1 problem(s) in" in err


def checking(pid: int) -> bool:
    return any("config_checker" in cmdline(c) for c in children(pid))


def test_a_reload_applies_the_file_as_it_was_when_asked(tmp_path: Path) -> None:
    """Two reloads asked back to back, the file rewritten between them: each applies the text of
    its own request, though the first is still being checked when the file changes."""
    port2 = free_port()
    with echo_edge(tmp_path) as (e, head, port, up_port):
        e.status()  # answered: the start is over (signal handlers installed)
        e.write_config(head + service(port, up_port) + "bad = 1\n")
        e.signal(signal.SIGHUP)
        # The daemon reads the file, then starts the checker: once it runs, the file may change.
        deadline = time.monotonic() + 15
        while not checking(e.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert checking(e.pid), e.log()
        e.write_config(head + service(port2, up_port))
        e.signal(signal.SIGHUP)
        assert wait_until(lambda: e.counter("reloads", "applied") == 1, 15), e.log()
        assert e.counter("reloads", "rejected") == 1
        assert "unknown option 'bad'" in e.log()


def handles(pid: int, *sigs: signal.Signals) -> bool:
    """Whether process `pid` ignores or catches each of `sigs` (SigIgn/SigCgt in /proc/PID/status)."""
    return signal_mask(pid, "SigIgn", "SigCgt") & signal_bits(*sigs) == signal_bits(*sigs)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_or_reopen_signal_during_the_start_does_not_end_the_edge(tmp_path: Path, workers: int) -> None:
    """SIGHUP and SIGUSR1 end a process by default. From its first instruction (once the
    interpreter has started) to the moment its loop handles them, the edge ignores them: a deploy
    script's reload or logrotate's reopen sent while it starts must not kill it."""
    admin, port = free_port(), free_port()
    sigs = (signal.SIGHUP, signal.SIGUSR1)
    with contextlib.closing(ThreadServer(echo_handler())) as up:
        cfg = tmp_path / "edge.toml"
        cfg.write_text(edge_head(tmp_path, admin, workers) + service(port, up.port))
        log = tmp_path / "edge.log"
        with open(log, "wb") as out, running([*EDGEWARD, "run", str(cfg)], stdout=out, stderr=subprocess.STDOUT) as p:
            assert wait_until(lambda: p.poll() is not None or handles(p.pid, *sigs), 15)
            sent_while_starting = 0
            answered = False
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and p.poll() is None and not answered:
                for pid in [p.pid, *children(p.pid)]:  # the checker and the workers too
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sigs[sent_while_starting % 2])
                sent_while_starting += 1
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                    c.sendall(b"ping")
                    answered = c.recv(4) == b"ping"
                time.sleep(0.005)
            assert p.poll() is None, log.read_text(errors="replace")
            assert answered and sent_while_starting > 1  # signals reached it before it served
            # The workers started with both blocked (child_process) and unblocked them once ignored.
            for pid in children(p.pid):
                if " worker " in cmdline(pid):
                    assert not signal_mask(pid, "SigBlk") & signal_bits(*sigs), cmdline(pid)


def test_a_storm_of_reload_signals_makes_few_checks_and_applies_the_last_file(tmp_path: Path) -> None:
    """A SIGHUP every 20 ms for about a second (a deploy loop, a misbehaving watcher): each newer
    one supersedes the reload still waiting for its turn, so the checker runs a few times, not
    once per signal, and the file as it was at the last signal is what runs."""
    port2 = free_port()
    with echo_edge(tmp_path) as (e, head, port, up_port):
        e.status()  # answered: the start is over (signal handlers installed)
        sent = 0
        deadline = time.monotonic() + 1.0
        while sent < 40 and time.monotonic() < deadline:
            e.signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.02)
        e.write_config(head + service(port, up_port) + service(port2, up_port).replace("echo", "echo2"))
        e.signal(signal.SIGHUP)
        assert wait_until(lambda: answers(port2), 30), e.log()  # the last file runs
        time.sleep(0.5)  # (nothing else is left to check)
        assert not checking(e.pid)
        applied = e.counter("reloads", "applied")
        assert sent > 20 and applied <= 4, (sent, applied, e.log())
        assert "supersedes the one still waiting" in e.log()


def test_a_reload_checker_signalled_while_it_starts_still_checks(tmp_path: Path) -> None:
    """`pkill -HUP edgeward` reaches the reload's checker too, often in its first milliseconds."""
    cfg = tmp_path / "edge.toml"
    cfg.write_text(service(free_port(), free_port()))

    async def check_under_signals() -> None:
        task = asyncio.ensure_future(load_checked_async(cfg))
        sent = 0
        while not task.done():
            for pid in children(os.getpid()):
                if "edgeward.config_checker" in cmdline(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, (signal.SIGHUP, signal.SIGUSR1)[sent % 2])
                        sent += 1
            await asyncio.sleep(0.002)
        assert (await task).services["echo"].to
        assert sent > 1

    for _ in range(3):
        asyncio.run(check_under_signals())
