"""Test support: the edge as a real subprocess, small real upstreams, Debian peers.

Everything binds 127.0.0.0/8 high ports; every process is stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bench.procs import stop_process

if TYPE_CHECKING:
    import trustme

ROOT = Path(__file__).resolve().parent.parent
EDGEWARD = [sys.executable, "-m", "edgeward"]


def free_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until `port` accepts; with `proc`, no longer than that process lives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise TimeoutError(f"{host}:{port} did not open: the process exited ({proc.returncode})") from None
            time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} did not open within {timeout}s")


def require(program: str) -> str:
    """Path of a Debian peer; skip the test locally when missing, fail under CI."""
    import pytest
    path = shutil.which(program) or (f"/usr/sbin/{program}" if os.path.exists(f"/usr/sbin/{program}") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed (scripts/install-peers.sh installs it)")
        pytest.skip(f"{program} not installed")
    return path


def signal_mask(pid: int, *fields: str) -> int:
    """The union of process `pid`'s signal masks named `fields` in /proc/PID/status ("SigBlk",
    "SigIgn", "SigCgt"...): bit (n - 1) is signal n."""
    mask = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            mask |= int(value, 16)
    return mask


def signal_bits(*sigs: int) -> int:
    """The mask bits of `sigs`, as signal_mask gives them."""
    return sum(1 << (s - 1) for s in set(sigs))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def steady_fds(pid: int) -> int:
    """Open descriptors of `pid` once the count holds: the same twice, 0.1 s apart (an admin
    connection that just answered is closed on a later turn of the edge's loop, and on a busy
    machine a close can take longer than one look)."""
    last, n = -1, open_fds(pid)
    for _ in range(30):
        if n == last:
            break
        time.sleep(0.1)
        last, n = n, open_fds(pid)
    return n


def fds_besides_pipe_pool(edge: EdgeProcess) -> int:
    """Open descriptors of the edge, not counting the idle pipes it keeps pooled for splice().

    Read when steady (`steady_fds`), and the pool's size and the count did not change across a
    second look."""
    n = pooled = 0
    for _ in range(10):
        pooled = int(edge.status()["pipes"]["pooled"])  # type: ignore[index]
        n = steady_fds(edge.pid)
        if int(edge.status()["pipes"]["pooled"]) == pooled and steady_fds(edge.pid) == n:  # type: ignore[index]
            break
    return n - 2 * pooled


def settles_to(edge: EdgeProcess, base: int, timeout: float = 5.0) -> int:
    """Poll the edge's descriptor count until it is back at `base` (or time runs out); returns the last."""
    deadline = time.monotonic() + timeout
    n = fds_besides_pipe_pool(edge)
    while n != base and time.monotonic() < deadline:
        time.sleep(0.1)
        n = fds_besides_pipe_pool(edge)
    return n


class EdgeProcess:
    """`edgeward run CONFIG` in a subprocess, with its admin API on a loopback port."""

    def __init__(self, tmp: Path, config: str, *, admin_port: int | None = None, wait: list[tuple[str, int]] | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.admin_port = admin_port or free_port()
        if "[edge]" not in config:
            config = f"[edge]\nadmin = \"127.0.0.1:{self.admin_port}\"\nstate_dir = \"{tmp / 'state'}\"\n" + config
        self.config_path = tmp / "edge.toml"
        self.config_path.write_text(config)
        self.log_path = tmp / "edge.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([*EDGEWARD, "run", str(self.config_path), *extra_args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, cwd=str(tmp))
        try:
            wait_port("127.0.0.1", self.admin_port, 15, self.proc)
            for h, p in wait or []:
                wait_port(h, p, 5, self.proc)
        except BaseException as e:
            self.stop()
            if isinstance(e, TimeoutError):  # say why: the edge's own words (a port in use, a bad config)
                raise TimeoutError(f"{e}; the edge's log ends:\n{self.log_path.read_text(errors='replace')[-3000:]}") \
                    from e
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        """The Prometheus text of /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10) as r:
            return r.read().decode()  # type: ignore[no-any-return]

    def api(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                return r.status, json.loads(raw) if r.headers.get_content_type() == "application/json" else raw.decode()
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def status(self) -> dict[str, object]:
        code, data = self.api("GET", "/status")
        assert code == 200, data
        assert isinstance(data, dict)
        return data

    def counter(self, *key: str) -> int:
        for c in self.status()["counters"]:  # type: ignore[union-attr]
            if tuple(c["key"]) == key:  # type: ignore[index]
                return int(c["value"])  # type: ignore[index]
        return 0

    def write_config(self, config: str) -> None:
        if "[edge]" not in config:
            config = f"[edge]\nadmin = \"127.0.0.1:{self.admin_port}\"\nstate_dir = \"{self.tmp / 'state'}\"\n" + config
        self.config_path.write_text(config)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def connect_from(src: str, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:port from the loopback address `src`."""
    c = socket.socket()
    c.bind((src, 0))
    c.settimeout(3)
    c.connect(("127.0.0.1", port))
    return c


def served(src: str, port: int) -> bool:
    """True if `src` gets its bytes echoed through the edge; False if the edge closed on it."""
    try:
        with connect_from(src, port) as c:
            c.sendall(b"ping")
            return c.recv(4) == b"ping"
    except OSError:
        return False


def write_cert(ca: trustme.CA, directory: Path, stem: str, *names: str) -> trustme.LeafCert:
    """A certificate of `ca` for `names`, written as `stem`.pem (the leaf) and `stem`.key."""
    cert = ca.issue_cert(*names)
    cert.cert_chain_pems[0].write_to_path(str(directory / f"{stem}.pem"))
    cert.private_key_pem.write_to_path(str(directory / f"{stem}.key"))
    return cert


def whole_lines(path: Path) -> list[str]:
    """The lines of a log another process is writing, without the last one when it has no newline
    yet: a read can see a line half-written (CI once read half of one of nginx's lines)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [x for x in data[: data.rfind(b"\n") + 1].decode().splitlines() if x.strip()]


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


class ThreadServer:
    """A small threaded TCP server on loopback; `handler(conn)` runs per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1", port: int = 0,
                 family: int = socket.AF_INET) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.port = int(self.sock.getsockname()[1])
        self.host = host
        self.handler = handler
        self.accepted = 0
        self.peers: list[tuple[str, int]] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                c, addr = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            self.peers.append(addr[:2])
            c.settimeout(None)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(c)
        with contextlib.suppress(OSError):
            c.close()

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.sock.close()


def echo_handler(tag: bytes = b"") -> Callable[[socket.socket], None]:
    """Echo; with a tag, first sends the tag so tests can tell upstreams apart."""
    def handle(c: socket.socket) -> None:
        if tag:
            c.sendall(tag)
        while data := c.recv(65536):
            c.sendall(data)
    return handle


def tls_server_handler(ctx: ssl.SSLContext, tag: bytes) -> Callable[[socket.socket], None]:
    """A TLS upstream: completes the handshake with its own certificate, says its tag and the SNI it saw."""
    def handle(c: socket.socket) -> None:
        seen: list[str | None] = [None]

        def sni_cb(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            seen[0] = name
        local = ctx
        local.sni_callback = sni_cb  # type: ignore[assignment]
        with local.wrap_socket(c, server_side=True) as s:
            s.sendall(tag + b" sni=" + (seen[0] or "-").encode() + b" alpn=" +
                      (s.selected_alpn_protocol() or "-").encode() + b"\n")
            with contextlib.suppress(OSError):
                while data := s.recv(65536):
                    s.sendall(data)
    return handle


def recv_line(s: socket.socket, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    buf = b""
    while not buf.endswith(b"\n"):
        d = s.recv(1)  # byte by byte: what follows the line stays for the caller
        if not d:
            break
        buf += d
    return buf


@contextlib.contextmanager
def proc(args: list[str], **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(args, **kw)  # type: ignore[call-overload]
    try:
        yield p
    finally:
        stop_process(p)


class UdpEcho:
    """A UDP echo on one or more ports of `host`, in a thread.

    With a tag, each reply is ``tag|local_port|peer_port|`` + the datagram, so tests can tell
    which server and port answered and from which edge socket the datagram came."""

    def __init__(self, host: str = "127.0.0.1", ports: tuple[int, ...] | list[int] = (0,), tag: str | None = None) -> None:
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        for p in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((host, p))
            s.setblocking(False)
            self.socks.append(s)
            self.sel.register(s, selectors.EVENT_READ)
        self.ports = [int(s.getsockname()[1]) for s in self.socks]
        self.port = self.ports[0]
        self.tag = tag
        self.peers: list[tuple[str, int]] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self.sel.select(0.1):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                while True:
                    try:
                        data, peer = s.recvfrom(65535)
                    except OSError:
                        break
                    self.peers.append(peer)
                    if self.tag is not None:
                        data = f"{self.tag}|{s.getsockname()[1]}|{peer[1]}|".encode() + data
                    with contextlib.suppress(OSError):
                        s.sendto(data, peer)

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        for s in self.socks:
            s.close()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text (labels given in the order the edge writes them)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {want} in /metrics")
