"""Socket handoff (issue 9): the edge gives the client socket itself to local servers over Unix
sockets (SCM_RIGHTS), and falls back to relaying when an endpoint is down, busy, slow or refuses.

The local servers are examples/handoff_tls_server.py (edgeward.handoff's asyncio side) with
their own certificates; the clients are Python's ssl, openssl s_client and curl.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from edgeward.codec.handoff import Ack, build_ack
from edgeward.codec.proxy import build_proxy_v2
from edgeward.handoff import HandoffError, HandoffReceiver, receive
from support import (
    ROOT,
    EdgeProcess,
    ThreadServer,
    free_port,
    require,
    tls_server_handler,
    wait_until,
)

EXAMPLE = ROOT / "examples" / "handoff_tls_server.py"


def unix_ready(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                time.sleep(0.02)
    raise TimeoutError(f"{path} did not open")


class ExampleServer:
    """examples/handoff_tls_server.py as a subprocess."""

    def __init__(self, tmp: Path, name: str, ca: trustme.CA, hostname: str) -> None:
        self.sock = tmp / f"{name}.sock"
        pem = tmp / f"{name}.pem"
        ca.issue_cert(hostname).private_key_and_cert_chain_pem.write_to_path(str(pem))
        self.log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--socket", str(self.sock), "--cert", str(pem),
                                      "--key", str(pem), "--name", name], stdout=self.log, stderr=subprocess.STDOUT)
        unix_ready(self.sock)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.log.close()


def https_get(port: int, ca: trustme.CA, sni: str, src: str = "127.0.0.1",
              proxy_header: bytes = b"") -> tuple[dict[str, str], tuple[str, int], ssl.SSLSocket]:
    """A verified TLS handshake through the edge and one request; the answer's fields, the client's own
    address, and the open connection (the caller closes it)."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    raw = socket.socket()
    raw.bind((src, 0))
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    if proxy_header:
        raw.sendall(proxy_header)
    s = ctx.wrap_socket(raw, server_hostname=sni)
    s.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
    fields = read_answer(s)
    local = s.getsockname()
    return fields, (local[0], local[1]), s


def read_answer(s: socket.socket) -> dict[str, str]:
    """The example server's answer to one request, as fields."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(4096)
        if not d:
            raise AssertionError(f"closed mid-answer: {buf!r}")
        buf += d
    head, body = buf.split(b"\r\n\r\n", 1)
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1])
    while len(body) < length:
        d = s.recv(4096)
        if not d:
            raise AssertionError(f"closed mid-answer: {buf!r}")
        body += d
    return dict(line.split(": ", 1) for line in body.decode().splitlines() if ": " in line)


def socket_inode(local_port: int, remote: tuple[str, int]) -> str:
    """The inode of the edge-side TCP socket of a loopback connection (from /proc/net/tcp)."""
    def hexaddr(ip: str, port: int) -> str:
        return f"{struct.unpack('<I', socket.inet_aton(ip))[0]:08X}:{port:04X}"
    want_local, want_remote = hexaddr("127.0.0.1", local_port), hexaddr(*remote)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == want_local and f[2] == want_remote:
            return f[9]
    raise AssertionError(f"no socket {want_local} <- {want_remote}")


def holds(pid: int, inode: str) -> bool:
    target = f"socket:[{inode}]"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
    return False


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def two_sites(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[EdgeProcess, int, ExampleServer, ExampleServer, ThreadServer]]:
    a = ExampleServer(tmp_path, "site-a", ca, "a.test")
    b = ExampleServer(tmp_path, "site-b", ca, "b.test")
    fb_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    fb_pem = tmp_path / "fallback.pem"
    ca.issue_cert("a.test", "b.test").private_key_and_cert_chain_pem.write_to_path(str(fb_pem))
    fb_ctx.load_cert_chain(str(fb_pem))
    fallback = ThreadServer(tls_server_handler(fb_ctx, b"FALLBACK"))
    port = free_port()
    edge = EdgeProcess(tmp_path, f"""
[listeners.tls]
bind = ["127.0.0.1:{port}"]
trusted_proxies = ["127.0.0.5/32"]

[handoffs.a]
socket = "{a.sock}"
ack_timeout = "2s"

[handoffs.b]
socket = "{b.sock}"

[services.a]
listen = ["tls"]
names = ["a.test"]
to = "a"
fallback = "127.0.0.1:{fallback.port}"

[services.b]
listen = ["tls"]
names = ["b.test"]
to = "b"
""", wait=[("127.0.0.1", port)])
    try:
        yield edge, port, a, b, fallback
    finally:
        edge.stop()
        a.stop()
        b.stop()
        fallback.close()


def test_two_names_handed_to_two_local_tls_servers(two_sites: tuple[EdgeProcess, int, ExampleServer, ExampleServer,
                                                                     ThreadServer], ca: trustme.CA) -> None:
    edge, port, _a, _b, fallback = two_sites
    for sni, served_by in (("a.test", "site-a"), ("b.test", "site-b"), ("a.test", "site-a")):
        fields, me, s = https_get(port, ca, sni)
        s.close()
        assert fields["served-by"] == served_by
        # The server's own getpeername() is the client, and the edge's record says the same.
        assert fields["peer"] == f"{me[0]}:{me[1]}" == fields["client"]
        assert fields["sni"] == sni and fields["service"] == sni[0] and fields["via-proxy"] == "false"
        assert fields["listener"] == f"127.0.0.1:{port}"
    assert fallback.accepted == 0
    assert edge.counter("handoffs", "a", "accepted") == 2
    assert edge.counter("handoffs", "b", "accepted") == 1
    assert edge.counter("closed", "tls", "handed_off") == 3


def test_the_edge_keeps_no_descriptor_of_a_handed_off_connection(
        two_sites: tuple[EdgeProcess, int, ExampleServer, ExampleServer, ThreadServer], ca: trustme.CA) -> None:
    edge, port, a, _b, _fb = two_sites
    _fields, me, s = https_get(port, ca, "a.test")
    with s:
        inode = socket_inode(port, me)
        assert holds(a.pid, inode), "the local server holds the client's socket"
        assert wait_until(lambda: not holds(edge.pid, inode), 2), "the edge still holds the client's socket"
        # The connection lives on without the edge: a second request on it.
        s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        assert read_answer(s)["served-by"] == "site-a"


def test_openssl_s_client_and_curl(two_sites: tuple[EdgeProcess, int, ExampleServer, ExampleServer, ThreadServer],
                                   ca: trustme.CA, tmp_path: Path) -> None:
    _edge, port, _a, _b, _fb = two_sites
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    openssl = require("openssl")
    out = subprocess.run([openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "b.test",
                          "-CAfile", str(ca_file), "-verify_return_error", "-verify_hostname", "b.test", "-brief",
                          "-quiet"], input=b"GET / HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
                         capture_output=True, timeout=20)
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert "Verification: OK" in text and "served-by: site-b" in text, text
    curl = require("curl")
    res = subprocess.run([curl, "-sS", "--max-time", "10", "--cacert", str(ca_file), "--resolve",
                          f"a.test:{port}:127.0.0.1", f"https://a.test:{port}/"], capture_output=True, timeout=20)
    assert b"served-by: site-a" in res.stdout and b"alpn: h2,http/1.1" in res.stdout, res.stderr


def test_client_address_from_a_trusted_proxy_header(
        two_sites: tuple[EdgeProcess, int, ExampleServer, ExampleServer, ThreadServer], ca: trustme.CA) -> None:
    _edge, port, _a, _b, _fb = two_sites
    hdr = build_proxy_v2(("203.0.113.9", 40000), ("198.51.100.1", 443))
    fields, me, s = https_get(port, ca, "b.test", src="127.0.0.5", proxy_header=hdr)
    s.close()
    assert fields["served-by"] == "site-b"
    assert fields["client"] == "203.0.113.9:40000" and fields["via-proxy"] == "true"
    assert fields["peer"] == f"127.0.0.5:{me[1]}"  # the socket's peer is the proxy in front
    assert fields["listener"] == "198.51.100.1:443"


def test_endpoint_killed_mid_run_sends_clients_to_the_fallback(
        two_sites: tuple[EdgeProcess, int, ExampleServer, ExampleServer, ThreadServer], ca: trustme.CA) -> None:
    edge, port, a, _b, fallback = two_sites
    results: list[str] = []
    errors: list[BaseException] = []
    killed = threading.Event()

    def client_loop() -> None:
        for i in range(40):  # bounded: 40 connections, each a full handshake
            if i == 10:
                a.stop(signal.SIGKILL)  # the socket file stays: connecting is refused
                killed.set()
            try:
                ctx = ssl.create_default_context()
                ca.configure_trust(ctx)
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                        ctx.wrap_socket(raw, server_hostname="a.test") as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                    results.append(s.recv(4096).decode(errors="replace"))
            except BaseException as e:
                errors.append(e)

    t = threading.Thread(target=client_loop)
    t.start()
    t.join(120)
    assert killed.is_set() and not errors, errors
    assert len(results) == 40
    assert all("served-by: site-a" in r for r in results[:10])
    assert all(r.startswith("FALLBACK sni=a.test") for r in results[10:]), results[10:]
    assert fallback.accepted == 30
    assert edge.counter("handoffs", "a", "down") == 30
    assert edge.counter("refused", "tls", "handoff_unavailable") == 0


def test_no_fallback_refuses_with_a_tls_alert_and_counts_it(
        two_sites: tuple[EdgeProcess, int, ExampleServer, ExampleServer, ThreadServer], ca: trustme.CA) -> None:
    edge, port, _a, b, _fb = two_sites
    b.stop()
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
        ctx.wrap_socket(raw, server_hostname="b.test")
    assert wait_until(lambda: edge.counter("refused", "tls", "handoff_unavailable") == 1)
    assert edge.counter("handoffs", "b", "down") == 1


# ---------------------------------------------------------------------- misbehaving endpoints
class RawEndpoint:
    """A handoff endpoint that misbehaves on purpose: `behaviour(control socket)` per handoff."""

    def __init__(self, path: Path, behaviour: object) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.behaviour = behaviour
        self.held: list[socket.socket] = []
        self.outcomes: list[str] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                ctl, _ = self.sock.accept()
            except OSError:
                continue
            self.held.append(ctl)
            threading.Thread(target=self.behaviour, args=(self, ctl), daemon=True).start()  # type: ignore[arg-type]

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        for c in self.held:
            c.close()
        self.sock.close()


@pytest.fixture
def raw_edge(tmp_path: Path, ca: trustme.CA, request: pytest.FixtureRequest) -> Iterator[tuple[EdgeProcess, int, RawEndpoint,
                                                                                              ThreadServer]]:
    behaviour, max_in_flight = request.param
    fb_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pem = tmp_path / "fb.pem"
    ca.issue_cert("a.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    fb_ctx.load_cert_chain(str(pem))
    fallback = ThreadServer(tls_server_handler(fb_ctx, b"FALLBACK"))
    ep = RawEndpoint(tmp_path / "raw.sock", behaviour)
    port = free_port()
    edge = EdgeProcess(tmp_path, f"""
[handoffs.raw]
socket = "{ep.path}"
ack_timeout = "500ms"
max_in_flight = {max_in_flight}

[services.a]
listen = ["127.0.0.1:{port}"]
names = ["a.test"]
to = "raw"
fallback = "127.0.0.1:{fallback.port}"
""", wait=[("127.0.0.1", port)])
    try:
        yield edge, port, ep, fallback
    finally:
        edge.stop()
        ep.close()
        fallback.close()


def tls_line(port: int, ca: trustme.CA) -> bytes:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="a.test") as s:
        return s.recv(200)


def _silent(ep: RawEndpoint, ctl: socket.socket) -> None:
    pass  # takes the control connection, never reads, never answers


def _refuses(ep: RawEndpoint, ctl: socket.socket) -> None:
    ctl.recv(4096)
    ctl.sendall(build_ack(Ack.BUSY))


def _late(ep: RawEndpoint, ctl: socket.socket) -> None:
    # Receives the socket properly but answers after the edge's ack_timeout: the library must
    # find out that the edge gave up, and drop its copy rather than serve the client too.
    try:
        sock, _rec = receive(ctl, decide=lambda r: (time.sleep(1.0), Ack.ACCEPTED)[1])
    except HandoffError as e:
        ep.outcomes.append(f"dropped: {e}")
    else:
        ep.outcomes.append("served")
        sock.close()


def _closes(ep: RawEndpoint, ctl: socket.socket) -> None:
    ctl.close()


@pytest.mark.parametrize("raw_edge, result", [((_silent, 64), "timeout"), ((_refuses, 64), "refused"),
                                               ((_late, 64), "timeout"), ((_closes, 64), "closed")],
                         indirect=["raw_edge"], ids=["silent", "refuses", "late", "closes"])
def test_misbehaving_endpoint_sends_the_client_to_the_fallback(
        raw_edge: tuple[EdgeProcess, int, RawEndpoint, ThreadServer], ca: trustme.CA, result: str) -> None:
    edge, port, ep, fallback = raw_edge
    # The ClientHello is still unread in the socket: the fallback completes the handshake.
    assert tls_line(port, ca).startswith(b"FALLBACK sni=a.test")
    assert fallback.accepted == 1
    assert edge.counter("handoffs", "raw", result) == 1
    if ep.behaviour is _late:
        assert wait_until(lambda: bool(ep.outcomes), 5)
        assert ep.outcomes[0].startswith("dropped"), ep.outcomes


@pytest.mark.parametrize("raw_edge", [(_silent, 1)], indirect=True)
def test_in_flight_bound_per_endpoint(raw_edge: tuple[EdgeProcess, int, RawEndpoint, ThreadServer],
                                      ca: trustme.CA) -> None:
    edge, port, _ep, fallback = raw_edge
    first = threading.Thread(target=tls_line, args=(port, ca))
    first.start()
    assert wait_until(lambda: len(_ep.held) == 1, 5)
    t0 = time.monotonic()
    assert tls_line(port, ca).startswith(b"FALLBACK")  # the bound is full: no wait for an ack
    busy_wait = time.monotonic() - t0
    first.join(10)
    assert edge.counter("handoffs", "raw", "busy") == 1
    assert edge.counter("handoffs", "raw", "timeout") == 1
    assert fallback.accepted == 2
    assert busy_wait < 5  # loose: only rules out having waited on an endpoint that never answers


def test_blocking_receiver_library(tmp_path: Path) -> None:
    """HandoffReceiver.accept() against the real edge, plain TCP (no sniffed name)."""
    path = tmp_path / "blocking.sock"
    port = free_port()
    with HandoffReceiver(str(path)) as rx:
        edge = EdgeProcess(tmp_path, f"""
[handoffs.plain]
socket = "{path}"

[services.plain]
listen = ["127.0.0.1:{port}"]
to = "plain"
""", wait=[])
        try:
            got: list[tuple[socket.socket, object]] = []
            t = threading.Thread(target=lambda: got.append(rx.accept()))
            t.start()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(b"hello, server\n")
                t.join(10)
                sock, rec = got[0]
                with sock:
                    assert sock.getpeername() == c.getsockname()
                    assert sock.recv(100) == b"hello, server\n"  # the first bytes, unread by the edge
                    sock.sendall(b"hi\n")
                    assert c.recv(100) == b"hi\n"
                assert rec.service == "plain" and rec.client == c.getsockname()  # type: ignore[attr-defined]
                assert rec.protocol == "unknown"  # type: ignore[attr-defined]
        finally:
            edge.stop()


def test_reload_moves_a_name_to_another_endpoint(
        two_sites: tuple[EdgeProcess, int, ExampleServer, ExampleServer, ThreadServer], ca: trustme.CA) -> None:
    edge, port, a, b, fallback = two_sites
    fields, _me, s = https_get(port, ca, "a.test")
    assert fields["served-by"] == "site-a"
    with s:
        # a.test now goes to site-b's endpoint (whose certificate does not cover a.test: the client
        # refuses it, which proves who answered); b.test is removed.
        edge.write_config(f"""
[handoffs.b]
socket = "{b.sock}"

[services.a]
listen = ["127.0.0.1:{port}"]
names = ["a.test"]
to = "b"
fallback = "127.0.0.1:{fallback.port}"
""")
        edge.signal(signal.SIGHUP)
        assert wait_until(lambda: edge.counter("reloads", "applied") == 1, 10), edge.log()
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                pytest.raises(ssl.SSLCertVerificationError, match=r"a\.test"):
            ctx.wrap_socket(raw, server_hostname="a.test")
        assert edge.counter("handoffs", "b", "accepted") == 1
        # The connection handed off before the reload is the server's: untouched by it.
        s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        assert read_answer(s)["served-by"] == "site-a"
    assert a.proc.poll() is None
