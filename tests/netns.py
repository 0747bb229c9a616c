"""Network namespaces for topology tests: created and removed by the test, nothing leaves them.

`in_netns(name)` switches the calling thread into a namespace (setns(2) via ctypes: Python 3.11
has no os.setns): sockets made inside stay in that namespace for their life, so one test process
can play the client, the home server and their peers at once. `run_in(name, argv)` starts a
program inside one (`ip netns exec`, which execs: the PID is the program's).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def sh(*args: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")


def require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if shutil.which("ip") is None:
        if os.environ.get("CI"):
            pytest.fail("ip is not installed (scripts/install-peers.sh installs iproute2)")
        pytest.skip("ip not installed")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block in namespace `name` (this thread only), then come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)


def run_in(name: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", name, *argv], **kw)


class Topology:
    """Namespaces joined by veth pairs; `link(a, b, addr_a, addr_b)` with CIDR addresses."""

    def __init__(self, tag: str) -> None:
        self.tag = f"{tag}{os.getpid() % 100000}"
        self.names: list[str] = []
        self._links = 0

    def ns(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        sh("ip", "netns", "add", name)
        self.names.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def link(self, a: str, b: str, addrs_a: Sequence[str], addrs_b: Sequence[str]) -> None:
        self._links += 1
        ia, ib = f"v{self._links}a", f"v{self._links}b"
        sh("ip", "link", "add", ia, "netns", a, "type", "veth", "peer", "name", ib, "netns", b)
        for ns, iface, addrs in ((a, ia, addrs_a), (b, ib, addrs_b)):
            for addr in addrs:
                sh("ip", "-n", ns, "addr", "add", addr, "dev", iface)
            sh("ip", "-n", ns, "link", "set", iface, "up")

    def close(self) -> None:
        for name in reversed(self.names):
            with contextlib.suppress(RuntimeError):
                sh("ip", "netns", "del", name)
        self.names.clear()


class UdpEchoes:
    """UDP servers on many ports of one address (a home server's TURN ports), on one thread:
    each datagram is answered with `reply(data, peer)` (default: the data itself)."""

    def __init__(self, host: str, ports: Sequence[int],
                 reply: Callable[[bytes, tuple[str, int]], bytes] = lambda data, _peer: data) -> None:
        self.sel = selectors.DefaultSelector()
        self.socks = []
        self.reply = reply
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((host, port))
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ)
            self.socks.append(s)
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self.sel.select(0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with contextlib.suppress(OSError):
                    data, peer = sock.recvfrom(2048)
                    sock.sendto(self.reply(data, peer), peer)

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        for s in self.socks:
            s.close()
