"""Scenario 01 (../shared/scenarios/01-jitsi-behind-edge.md): a videoconference VM behind an edge
that owns 80/443.

Stand-ins: nginx with a self-signed certificate for the VM's web UI, a websockets echo server for
/xmpp-websocket and /colibri-ws, a TCP echo on 4443 and a UDP echo on 10000; pebble (Debian) as
the ACME CA, validating through the edge's own 80 (HTTP-01) or 443 (TLS-ALPN-01); another name on
the same 443 relayed untouched to its own TLS server.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from websockets.sync.server import ServerConnection, serve

from http_peers import get, nginx_upstream, read_response, wss_exchange
from pebble_peer import pebble
from support import (
    EdgeProcess,
    ThreadServer,
    UdpEcho,
    echo_handler,
    free_port,
    require,
    tls_server_handler,
    wait_until,
    write_cert,
)


class WsEcho:
    """A websockets echo server on a thread (the VM's prosody/videobridge websocket stand-in)."""

    def __init__(self) -> None:
        self.paths: list[str] = []

        def echo(ws: ServerConnection) -> None:
            assert ws.request is not None
            self.paths.append(ws.request.path)
            for msg in ws:
                ws.send(msg)
        self.server = serve(echo, "127.0.0.1", 0, ping_interval=None)
        self.port = int(self.server.socket.getsockname()[1])
        self._t = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._t.start()

    def close(self) -> None:
        self.server.shutdown()
        self._t.join(5)


@pytest.fixture
def stand_ins(tmp_path: Path) -> Iterator[dict[str, object]]:
    require("nginx")
    vm_ca = trustme.CA()  # the VM's own self-signed world: the edge trusts it by its CA file
    vm_ca.cert_pem.write_to_path(str(tmp_path / "vm-ca.pem"))
    write_cert(vm_ca, tmp_path, "vm", "127.0.0.1", "meet-vm.internal")
    cloud_ca = trustme.CA()
    cloud_ca.cert_pem.write_to_path(str(tmp_path / "cloud-ca.pem"))
    cloud_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cloud_ca.issue_cert("cloud.test").configure_cert(cloud_ctx)
    cloud = ThreadServer(tls_server_handler(cloud_ctx, b"cloud"))
    jvb_tcp = ThreadServer(echo_handler(b"jvb-tcp\n"))
    jvb_udp = UdpEcho()
    ws = WsEcho()
    with nginx_upstream(tmp_path / "vm", tls=(tmp_path / "vm.pem", tmp_path / "vm.key")) as vm:
        try:
            yield {"vm": vm, "cloud": cloud, "jvb_tcp": jvb_tcp, "jvb_udp": jvb_udp, "ws": ws}
        finally:
            ws.close()
            cloud.close()
            jvb_tcp.close()
            jvb_udp.close()


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_scenario_01(tmp_path: Path, stand_ins: dict[str, object], challenge: str) -> None:
    vm, cloud, jvb_tcp, jvb_udp, ws = (stand_ins[k] for k in ("vm", "cloud", "jvb_tcp", "jvb_udp", "ws"))
    with pebble(tmp_path / "pebble", resolve=("meet.test",)) as ca:
        web80, web443 = ca.http_port, ca.tls_port  # the ports pebble validates on: the edge's 80 and 443
        media_tcp, media_udp, admin = free_port(), free_port(), free_port()
        # The user's part is the [services.*] blocks; the rest points the edge at the test's ports and CA.
        # In the real setup the media ports are the same on the VM (`to = "10.0.0.5"`); the stand-ins
        # listen on other ports here, so they are named.
        config = f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"

[acme]
directory = "{ca.directory}"
ca_file = "{ca.ca_file}"
challenges = ["{challenge}"]
retry_min = "1s"

[http]
redirect = "127.0.0.1:{web80}"

[listeners.media-udp]
bind = ["udp/127.0.0.1:{media_udp}"]
udp_idle_timeout = "2s"

[services.meet]
listen = ["127.0.0.1:{web443}"]
names = ["meet.test"]
to = "https://127.0.0.1:{vm.tls_port}"          # the VM's own nginx, self-signed
upstream_tls = {{ ca = "{tmp_path / 'vm-ca.pem'}" }}

[services.meet-ws]
listen = ["127.0.0.1:{web443}"]
names = ["meet.test"]
paths = ["/xmpp-websocket", "/colibri-ws"]
to = "http://127.0.0.1:{ws.port}"

[services.meet-tcp]
listen = ["127.0.0.1:{media_tcp}"]
to = "127.0.0.1:{jvb_tcp.port}"

[services.meet-udp]
listen = ["media-udp"]
to = "127.0.0.1:{jvb_udp.port}"

[services.cloud]                                 # another name on the same 443, relayed untouched
listen = ["127.0.0.1:{web443}"]
names = ["cloud.test"]
to = "127.0.0.1:{cloud.port}"
"""
        edge = EdgeProcess(tmp_path, config, admin_port=admin, wait=[("127.0.0.1", web443), ("127.0.0.1", web80)])
        try:
            run_checks(tmp_path, edge, ca.root_pem(), web80, web443, media_tcp, media_udp, stand_ins, challenge)
        finally:
            edge.stop()


def run_checks(tmp: Path, edge: EdgeProcess, root: bytes, web80: int, web443: int, media_tcp: int, media_udp: int,
               s: dict[str, object], challenge: str) -> None:
    cloud_ca, ws = tmp / "cloud-ca.pem", s["ws"]

    def acme_state() -> str:
        return str(edge.status()["web"]["acme"].get("meet.test", {}).get("state"))  # type: ignore[index, union-attr]
    assert wait_until(lambda: acme_state() == "valid", 60), f"no certificate: {edge.status()['web']}\n{edge.log()}"
    (tmp / "pebble-root.pem").write_bytes(root)
    # pebble's chain: leaf ← intermediate ← root; the client trusts only pebble's root.
    ctx = ssl.create_default_context(cafile=str(tmp / "pebble-root.pem"))

    # 1. https://meet.test/ through the edge, with the edge's ACME certificate; the VM sees forwarded headers.
    with socket.create_connection(("127.0.0.1", web443), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="meet.test") as t:
        t.sendall(b"GET /room42 HTTP/1.1\r\nHost: meet.test\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        r = read_response(t)
    assert r is not None and r.status == 200
    seen = r.json()
    assert seen["xff"] == "127.0.0.1" and seen["xfp"] == "https" and seen["xfh"] == "meet.test"
    assert seen["scheme"] == "https" and seen["uri"] == "/room42"  # nginx got it over TLS (self-signed)
    assert edge.status()["web"]["acme"]["meet.test"]["challenge"] == challenge  # type: ignore[index]

    # 2. http:// redirects permanently to https, except the ACME challenge path, which the edge answers.
    red = get(web80, "/room42?x=1", host="meet.test")
    assert red.status in (301, 308) and red.header("Location") == f"https://meet.test:{web443}/room42?x=1"
    chal = get(web80, "/.well-known/acme-challenge/not-a-token", host="meet.test")
    assert chal.status == 404  # answered by the edge (no such token), not redirected

    # 3. WebSockets on /xmpp-websocket and /colibri-ws pass through and survive a long idle period.
    # (websockets' asyncio client: its sync client is not safe over TLS, see wss_exchange.)
    for path in ("/xmpp-websocket", "/colibri-ws/jvb1/abc"):
        sent: list[str | bytes] = ["hello " + path, b"\x00" * 70000]
        assert wss_exchange(web443, f"wss://meet.test:{web443}{path}", ctx, "meet.test", sent,
                            idle_after_first=1.5 if path == "/xmpp-websocket" else 0) == sent  # idle: nothing cuts it
    assert ws.paths == ["/xmpp-websocket", "/colibri-ws/jvb1/abc"]  # type: ignore[attr-defined]

    # 4. Another name on the same 443 is relayed with its own certificate (the edge holds no key of it).
    cctx = ssl.create_default_context(cafile=str(cloud_ca))
    with socket.create_connection(("127.0.0.1", web443), timeout=10) as raw, \
            cctx.wrap_socket(raw, server_hostname="cloud.test") as t:
        assert t.recv(100).startswith(b"cloud sni=cloud.test")

    # 5. TCP 4443 reaches the videobridge; UDP 10000 keeps a session per client and answers each.
    with socket.create_connection(("127.0.0.1", media_tcp), timeout=10) as c:
        assert c.recv(8) == b"jvb-tcp\n"
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
    clients = []
    for i in range(5):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind((f"127.0.0.{20 + i}", 0))
        u.settimeout(5)
        clients.append(u)
    for i, u in enumerate(clients):
        u.sendto(f"media {i}".encode(), ("127.0.0.1", media_udp))
    for i, u in enumerate(clients):
        data, src = u.recvfrom(100)
        assert data == f"media {i}".encode() and src == ("127.0.0.1", media_udp)
    assert edge.status()["udp_sessions"] == 5
    for u in clients:
        u.close()
    # Idle sessions expire (udp_idle_timeout 2s here).
    assert wait_until(lambda: edge.status()["udp_sessions"] == 0, 6)
    assert edge.counter("closed", "media-udp", "udp_idle") == 5
