"""Network namespaces for topology tests: created and removed by the test, nothing leaves them.

`in_netns(name)` switches the calling thread into a namespace (setns(2) via ctypes: Python 3.11
has no os.setns): sockets made inside stay in that namespace for their life, so one test process
can play the client, the home server and their peers at once. Making namespaces, linking them
and running programs inside them is bench/netns.py's (`Topology`, `running`, `run_in`, `sh`),
shared with the namespace benchmarks.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import shutil
import socket
import threading
from collections.abc import Callable, Iterator, Sequence

import pytest
from bench.netns import Topology, ns, run_in, running, sh

__all__ = ["Topology", "UdpEchoes", "in_netns", "ns", "require_netns", "run_in", "running", "sh"]

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


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
