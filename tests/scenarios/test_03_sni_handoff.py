"""Scenario 03 (../shared/scenarios/03-transparent-handoff.md): TLS services share one port by SNI
and ALPN; the edge never decrypts. A remote upstream is relayed with PROXY v2 (Debian's nginx,
`listen ... proxy_protocol`), a wildcard goes to a pool, an ALPN-selected route to another server,
and a local server takes the client socket itself by handoff (examples/handoff_tls_server.py, on
edgeward.handoff), reading the ClientHello as if it had accepted the connection. Transparent mode
is tested in network namespaces in tests/integration/test_transparent.py.
"""

from __future__ import annotations

import itertools
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from peers import nginx
from support import (
    ROOT,
    EdgeProcess,
    ThreadServer,
    free_port,
    require,
    tls_server_handler,
    wait_until,
)

SNIFF_TIMEOUT = 1.0


def tls_exchange(port: int, ctx: ssl.SSLContext, sni: str, request: bytes,
                 first_flight: Callable[[bytes], list[bytes]] = lambda b: [b],
                 until: bytes | None = None) -> tuple[bytes, ssl.SSLObject]:
    """A TLS handshake and one request over a plain socket, the ClientHello sent as `first_flight`
    cuts it (several TCP segments, several TLS records); the answer until the server closes (or
    until `until` arrived)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    first = True
    with sock:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = out.read()
                for piece in first_flight(data) if first else [data]:
                    sock.sendall(piece)
                    if first:
                        time.sleep(0.05)  # separate TCP segments, each peeked by the edge on its own
                first = False
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the handshake") from None
                inc.write(chunk)
        sock.sendall(out.read())
        obj.write(request)
        sock.sendall(out.read())
        answer = b""
        while until is None or until not in answer:
            try:
                data = obj.read(65536)
                if not data:
                    break
                answer += data
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            inc.write(chunk)
    return answer, obj


def split_records(data: bytes, at: int) -> bytes:
    """The ClientHello record cut into two TLS records (a handshake message may span records)."""
    assert data[0] == 0x16
    body = data[5:5 + int.from_bytes(data[3:5], "big")]
    head = data[1:3]
    return (b"\x16" + head + len(body[:at]).to_bytes(2, "big") + body[:at]
            + b"\x16" + head + len(body[at:]).to_bytes(2, "big") + body[at:] + data[5 + len(body):])


def segments(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.fixture
def scenario(tmp_path: Path) -> Iterator[dict[str, object]]:
    require("nginx")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    def server_ctx(*names: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(ctx)
        return ctx

    xmpp = ThreadServer(tls_server_handler(server_ctx("example.test"), b"XMPP"))
    apps = [ThreadServer(tls_server_handler(server_ctx("*.apps.test"), tag)) for tag in (b"APP1", b"APP2")]
    pem = tmp_path / "local.pem"
    ca.issue_cert("local.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    handoff_sock = tmp_path / "local.sock"
    local_log = open(tmp_path / "local.log", "wb")  # noqa: SIM115 - closed below
    local = subprocess.Popen([sys.executable, str(ROOT / "examples" / "handoff_tls_server.py"), "--socket",
                              str(handoff_sock), "--cert", str(pem), "--key", str(pem), "--name", "local"],
                             stdout=local_log, stderr=subprocess.STDOUT)
    mail_pem = tmp_path / "mail.pem"
    ca.issue_cert("mail.test").private_key_and_cert_chain_pem.write_to_path(str(mail_pem))
    mail_port = free_port()
    edge_port = free_port()
    http = f"""
    log_format pp '$proxy_protocol_addr $remote_addr $ssl_server_name';
    server {{
        listen 127.0.0.1:{mail_port} ssl proxy_protocol;
        ssl_certificate {mail_pem};
        ssl_certificate_key {mail_pem};
        access_log {tmp_path}/nginx/logs/mail.log pp;
        location / {{ return 200 "mail sees $proxy_protocol_addr\\n"; }}
    }}"""
    try:
        with nginx(tmp_path, http, [mail_port]) as prefix:
            assert wait_until(handoff_sock.exists, 10)
            edge = EdgeProcess(tmp_path, f"""
[listeners.tls]
bind = ["127.0.0.1:{edge_port}"]
sniff_timeout = "{SNIFF_TIMEOUT}s"

[services.mail]
listen = ["tls"]
names = ["mail.test"]
to = "127.0.0.1:{mail_port}"
proxy_protocol = "v2"

[services.xmpp-direct-tls]
listen = ["tls"]
names = ["example.test"]
alpn = ["xmpp-client"]
to = "127.0.0.1:{xmpp.port}"

[services.apps]
listen = ["tls"]
names = ["*.apps.test"]
to = "apps"

[pools.apps]
servers = ["127.0.0.1:{apps[0].port}", "127.0.0.1:{apps[1].port}"]

[handoffs.local]
socket = "{handoff_sock}"

[services.local]
listen = ["tls"]
names = ["local.test"]
to = "local"
""", wait=[("127.0.0.1", edge_port)])
            try:
                yield {"edge": edge, "port": edge_port, "ca": ca, "mail_log": prefix / "logs" / "mail.log",
                       "apps": apps, "xmpp": xmpp}
            finally:
                edge.stop()
    finally:
        local.send_signal(signal.SIGTERM)
        local.wait(10)
        local_log.close()
        xmpp.close()
        for a in apps:
            a.close()


def client_ctx(ca: trustme.CA, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def test_scenario_03(scenario: dict[str, object]) -> None:
    edge, port, ca = scenario["edge"], scenario["port"], scenario["ca"]
    assert isinstance(edge, EdgeProcess) and isinstance(port, int) and isinstance(ca, trustme.CA)
    mail_log = scenario["mail_log"]
    assert isinstance(mail_log, Path)

    # PROXY v2 to nginx: the handshake is with nginx's own certificate (verified for mail.test),
    # and nginx's log shows the client's real address.
    answer, tls = tls_exchange(port, client_ctx(ca), "mail.test", b"GET / HTTP/1.0\r\nHost: mail.test\r\n\r\n")
    assert b"mail sees 127.0.0.1" in answer, answer
    assert ("DNS", "mail.test") in tls.getpeercert()["subjectAltName"]  # type: ignore[index, operator]
    assert wait_until(lambda: mail_log.exists() and "127.0.0.1 127.0.0.1 mail.test" in mail_log.read_text())

    # ALPN picks the XMPP direct-TLS route for example.test; the wildcard pool takes any *.apps.test.
    answer, _ = tls_exchange(port, client_ctx(ca, ["xmpp-client"]), "example.test", b"", until=b"\n")
    assert answer.startswith(b"XMPP sni=example.test"), answer  # chosen by the ALPN the client offered
    tags = set()
    for i in range(4):
        answer, _ = tls_exchange(port, client_ctx(ca), f"n{i}.apps.test", b"", until=b"\n")
        tags.add(answer[:4])
    assert tags == {b"APP1", b"APP2"}

    # Handoff: the local server reads the ClientHello itself (its own certificate, verified), even
    # one split over TCP segments and TLS records, and its getpeername() is the client.
    for flight in (lambda b: [b], lambda b: segments(b, 3, 40), lambda b: segments(split_records(b, 60), 7, 70)):
        answer, _ = tls_exchange(port, client_ctx(ca), "local.test",
                                   b"GET / HTTP/1.1\r\nHost: local.test\r\nConnection: close\r\n\r\n", flight)
        fields = dict(line.split(": ", 1) for line in answer.decode().split("\r\n\r\n", 1)[1].splitlines())
        assert fields["served-by"] == "local" and fields["sni"] == "local.test"
        assert fields["peer"] == fields["client"] and fields["peer"].startswith("127.0.0.1:")
    assert edge.counter("handoffs", "local", "accepted") == 3

    # A hello that never completes is closed after the sniff timeout; garbage is closed (no
    # default route here); neither reaches any upstream, and both are counted.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        hello_start = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
        c.sendall(hello_start)
        t0 = time.monotonic()
        try:
            assert c.recv(100) == b""
        except ConnectionResetError:
            pass
        assert SNIFF_TIMEOUT - 0.2 < time.monotonic() - t0 < SNIFF_TIMEOUT + 3
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"\x00garbage that is no protocol at all\r\n\r\n")
        try:
            assert c.recv(100) == b""
        except ConnectionResetError:
            pass
    assert wait_until(lambda: edge.counter("refused", "tls", "sniff_timeout") == 1
                      and edge.counter("refused", "tls", "no_route") == 1)
    assert edge.counter("handoffs", "local", "accepted") == 3
