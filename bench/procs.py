"""Starting, watching and stopping the processes a benchmark run needs.

Every process is started in its own session so that it (and anything it
forks, e.g. the nginx worker) can be signalled by its own PID/PGID, never
by name: the machine may run other haproxy/nginx instances (tests, users).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def raise_nofile_limit(wanted: int | None = None) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit (to the hard limit by default).

    Children inherit it, so the proxies, echo servers and clients can each hold
    the ~18,000 descriptors the idle-memory case needs.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else min(wanted, hard)
    if hard == resource.RLIM_INFINITY and wanted is None:
        target = 1 << 20
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def stop_pid(pid: int, timeout: float = 5.0, group: bool = True) -> bool:
    """Stop one process we started: SIGTERM, wait, then SIGKILL.

    With group=True the signal goes to the process group led by pid (our
    children are session leaders), so forked workers go down with it.
    Returns True if the process was running when called.
    """

    def send(sig: int) -> bool:
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            # Not our group (pid reused or not a leader): fall back to the pid alone.
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return False
        return True

    if not send(signal.SIGTERM):
        _reap(pid)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _reap(pid) or not _alive(pid):
            # The leader is gone; make sure no member of its group lingers.
            if group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            return True
        time.sleep(0.02)
    send(signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (_reap(pid) or not _alive(pid)):
        time.sleep(0.02)
    return True


def wait_for(pred: Callable[[], object], timeout: float = 15.0, what: str = "a benchmark process") -> None:
    """Poll `pred` until it is true; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise TimeoutError(f"{what} did not start within {timeout:g} s")


def stop_process(p: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """Stop a program started with Popen (one process, its own exit status kept by Popen):
    SIGTERM, `grace` seconds to exit, then SIGKILL. Nothing if it has already exited."""
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def _reap(pid: int) -> bool:
    """Collect a child's exit status if it is ours and has exited."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")


@dataclass
class Proc:
    """A started process; `pid` is what we stop."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


@dataclass
class ProcessGroup:
    """Owns every process a run starts and stops them all, newest first.

    Used as a context manager so that Ctrl-C or an exception anywhere still
    stops each process by its PID.
    """

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: set[int] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed right after the fork, child keeps it
        preexec: Callable[[], None] | None = None
        if cpus:
            wanted = set(cpus)

            def preexec() -> None:
                # Pin in the child before exec so the program never runs elsewhere.
                os.sched_setaffinity(0, wanted)

        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=stdout if stdout is not None else log,
                stderr=log,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
                preexec_fn=preexec,
            )
        finally:
            log.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        stop_pid(proc.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=0.1)
        for stream in (proc.popen.stdin, proc.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_port(
    port: int, host: str = "127.0.0.1", timeout: float = 10.0, proc: Proc | None = None
) -> None:
    """Wait until host:port accepts a TCP connection (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode} before listening on "
                f"{port}:\n{proc.log_tail()}"
            )
        with socket.socket() as s:
            s.settimeout(0.2)
            try:
                s.connect((host, port))
                return
            except OSError:
                time.sleep(0.05)
    tail = proc.log_tail() if proc else ""
    raise TimeoutError(f"nothing accepted on {host}:{port} within {timeout}s\n{tail}")


def children(pid: int) -> list[int]:
    """Direct and indirect children of pid, from /proc (no psutil needed)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
            parent_of[int(entry)] = int(rest[1])
        except (OSError, IndexError, ValueError):
            continue
    out: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        out.extend(kids)
        frontier.extend(kids)
    return out


def tree(pid: int) -> list[int]:
    return [pid, *children(pid)]


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime+stime of the given processes, in seconds (their own accounting)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
            # Fields after the comm: state=0 ... utime=11, stime=12 (stat(5) 14 and 15).
            total += int(rest[11]) + int(rest[12])
    return total / CLK_TCK


def memory_kb(pids: Sequence[int]) -> dict[str, int]:
    """Summed RSS and PSS in KiB.

    PSS is recorded too because nginx's master and worker share pages: summing
    their RSS counts shared pages twice, summing PSS does not.
    """
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return {"rss_kb": rss, "pss_kb": pss}


@contextlib.contextmanager
def measured(pids_of: Callable[[], Sequence[int]]) -> Iterator[dict[str, float]]:
    """CPU seconds used by a process tree during the with-block."""
    out: dict[str, float] = {}
    pids = list(pids_of())
    before = cpu_seconds(pids)
    yield out
    out["cpu_s"] = cpu_seconds(pids) - before
