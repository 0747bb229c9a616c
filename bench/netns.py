"""Network namespaces joined by veth pairs, for benchmarks and tests (root only).

One place for what the namespace benchmarks (kernel_path.py, transparent.py) and tests
(tests/netns.py builds on this) all do: make named namespaces, link two with a veth pair
carrying IPv4 and IPv6 addresses, run commands and programs inside one, remove them all.
Nothing leaves the namespaces.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.procs import stop_process


def sh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command; with `check`, a failure raises with the command's own message."""
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


def ns(name: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace `name`."""
    return sh("ip", "netns", "exec", name, *args, check=check, timeout=timeout)


def run_in(name: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start a program inside namespace `name` (`ip netns exec` execs: the PID is the program's)."""
    return subprocess.Popen(["ip", "netns", "exec", name, *argv], **kw)


@contextlib.contextmanager
def running(name: str, argv: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A program inside namespace `name` for the block, its output appended to `log`; stopped by PID
    (SIGTERM, then SIGKILL after 10 s) when the block ends."""
    with open(log, "ab") as out:
        p = run_in(name, argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield p
    finally:
        stop_process(p, grace=10)


class Topology:
    """Namespaces joined by veth pairs; removed by `close()` (or at the end of a `with`)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._links = 0

    def add(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.names.append(name)
        ns(name, "ip", "link", "set", "lo", "up")
        return name

    def link(self, a: str, b: str, addrs_a: Sequence[str], addrs_b: Sequence[str]) -> None:
        """A veth pair between namespaces `a` and `b`, with CIDR addresses on each end (IPv6 ones
        without duplicate address detection, so they are usable at once)."""
        self._links += 1
        ia, ib = f"v{self._links}a", f"v{self._links}b"
        sh("ip", "link", "add", ia, "netns", a, "type", "veth", "peer", "name", ib, "netns", b)
        for name, iface, addrs in ((a, ia, addrs_a), (b, ib, addrs_b)):
            for addr in addrs:
                if ":" in addr:
                    ns(name, "ip", "-6", "addr", "add", addr, "dev", iface, "nodad")
                else:
                    ns(name, "ip", "addr", "add", addr, "dev", iface)
            ns(name, "ip", "link", "set", iface, "up")

    def close(self) -> None:
        for name in reversed(self.names):
            sh("ip", "netns", "del", name, check=False)
        self.names.clear()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
