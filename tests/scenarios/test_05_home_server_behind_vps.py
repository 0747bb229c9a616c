"""Scenario 05 (../shared/scenarios/05-home-server-behind-vps.md), user-space part, end to end in
network namespaces this test creates: an internet client, the VPS edge and the home server, joined
by veth pairs (the second one stands for the tunnel). The edge runs examples/05 as written (only
its admin socket and state directory moved into the test's directory).

- every web name (SNI passthrough to nginx at home, which learns the client's address from PROXY
  v2), every forwarded TCP port and the UDP ports and range reach home through the edge;
- the home address is not routable from the client and never appears in what the client gets;
- 200 UDP clients over the 301-port range cost one descriptor each, not one per port per client.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from edgeward.admin.client import admin_request
from netns import Topology, UdpEchoes, in_netns, require_netns, run_in
from support import ThreadServer, echo_handler, require, steady_fds, write_cert

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "05-home-server-behind-vps.toml"
EDGE_PUBLIC, CLIENT_A, CLIENT_B = "198.51.100.1", "198.51.100.2", "198.51.100.3"
EDGE_TUNNEL, HOME = "10.8.0.1", "10.8.0.2"
WEB_NAMES = ("social.example.org", "cloud.example.org", "photos.blog.example.org")
TCP_PORTS = (5222, 5269, 5000, 3478, 3479)
UDP_PORTS = (3478, 3479, *range(49152, 49453))


@dataclass
class Vps:
    topo: Topology
    client: str
    edge_pid: int
    admin: str
    ca: trustme.CA
    received: list[bytes]  # everything the client got, to look for the home address in

    def status(self) -> dict[str, object]:
        code, data = admin_request("GET", "/status", self.admin, None)
        assert code == 200
        return data  # type: ignore[no-any-return]


def home_nginx(ns: str, tmp: Path, cert: Path, key: Path) -> subprocess.Popen[bytes]:
    prefix = tmp / "nginx"
    (prefix / "logs").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{                                  # the web apps: PROXY v2 from the edge
        listen {HOME}:443 ssl proxy_protocol;
        location / {{ default_type text/plain; return 200 "web $ssl_server_name client=$proxy_protocol_addr\\n"; }}
    }}
    server {{                                  # prosody's https port (no PROXY there)
        listen {HOME}:5281 ssl;
        location / {{ default_type text/plain; return 200 "chat-web $ssl_server_name\\n"; }}
    }}
}}
""")
    return run_in(ns, [require("nginx"), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs/error.log")],
                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def wait_tcp(ns: str, host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with in_netns(ns):
            s = socket.socket()
        try:
            s.settimeout(1)
            s.connect((host, port))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            s.close()


@pytest.fixture(scope="module")
def vps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vps]:
    require_netns()
    tmp = tmp_path_factory.mktemp("scenario05")
    ca = trustme.CA()
    write_cert(ca, tmp, "home", *WEB_NAMES, "chat.example.org")
    topo = Topology()
    tag = f"ew5{os.getpid() % 100000}"
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[ThreadServer | UdpEchoes] = []
    try:
        client, edge, home = topo.add(f"{tag}-c"), topo.add(f"{tag}-e"), topo.add(f"{tag}-h")
        topo.link(client, edge, [f"{CLIENT_A}/24", f"{CLIENT_B}/24"], [f"{EDGE_PUBLIC}/24"])
        topo.link(edge, home, [f"{EDGE_TUNNEL}/24"], [f"{HOME}/24"])  # the tunnel
        procs.append(home_nginx(home, tmp, tmp / "home.pem", tmp / "home.key"))
        with in_netns(home):
            servers += [ThreadServer(echo_handler(f"{p}:".encode()), host=HOME, port=p) for p in TCP_PORTS]
            servers.append(UdpEchoes(HOME, UDP_PORTS))
        admin = f"unix:{tmp / 'admin.sock'}"
        config = EXAMPLE.read_text().replace('"unix:/run/edgeward/admin.sock"', json.dumps(admin)) \
            .replace('"/var/lib/edgeward"', json.dumps(str(tmp / "state")))
        (tmp / "edge.toml").write_text(config)
        log = open(tmp / "edge.log", "wb")  # noqa: SIM115 - closed below
        edge_proc = run_in(edge, [str(ROOT / ".venv/bin/edgeward") if (ROOT / ".venv/bin/edgeward").exists()
                                  else "edgeward", "run", str(tmp / "edge.toml")],
                           stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        procs.append(edge_proc)
        wait_tcp(home, HOME, 443)
        wait_tcp(client, EDGE_PUBLIC, 5222)
        yield Vps(topo, client, edge_proc.pid, admin, ca, [])
        log.close()
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for s in servers:
            s.close()
        topo.close()


def client_socket(vps: Vps, kind: int = socket.SOCK_STREAM, src: str = CLIENT_A) -> socket.socket:
    with in_netns(vps.client):
        s = socket.socket(socket.AF_INET, kind)
    s.bind((src, 0))
    s.settimeout(5)
    return s


def https_get(vps: Vps, name: str, src: str = CLIENT_A) -> bytes:
    s = client_socket(vps, src=src)
    s.connect((EDGE_PUBLIC, 443))
    ctx = ssl.create_default_context()
    vps.ca.configure_trust(ctx)
    with ctx.wrap_socket(s, server_hostname=name) as t:
        vps.received.append(t.getpeercert(binary_form=True) or b"")
        t.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := t.recv(65536):
            out += chunk
    vps.received.append(out)
    return out


def test_every_web_name_reaches_home_which_learns_the_client_address(vps: Vps) -> None:
    for name in WEB_NAMES:
        body = https_get(vps, name)
        assert body.startswith(b"HTTP/1.1 200") and f"web {name} client={CLIENT_A}\n".encode() in body, body
    assert f"client={CLIENT_B}".encode() in https_get(vps, "cloud.example.org", src=CLIENT_B)
    assert b"chat-web chat.example.org" in https_get(vps, "chat.example.org")


def test_every_forwarded_tcp_port_reaches_home(vps: Vps) -> None:
    for port in TCP_PORTS:
        s = client_socket(vps)
        with s:
            s.connect((EDGE_PUBLIC, port))
            s.sendall(b"hello")
            got = b""
            while len(got) < len(f"{port}:hello"):
                d = s.recv(100)
                if not d:  # (EOF: the assertion below says what came, rather than spinning)
                    break
                got += d
        vps.received.append(got)
        assert got == f"{port}:hello".encode()


def test_udp_ports_and_range_reach_home_and_answer_from_the_edge(vps: Vps) -> None:
    for port in (3478, 3479, 49152, 49300, 49452):
        s = client_socket(vps, socket.SOCK_DGRAM)
        with s:
            s.sendto(f"turn {port}".encode(), (EDGE_PUBLIC, port))
            data, src = s.recvfrom(2048)
        vps.received.append(data)
        assert data == f"turn {port}".encode() and src == (EDGE_PUBLIC, port)


def test_the_home_address_is_neither_routable_nor_seen_by_the_client(vps: Vps) -> None:
    s = client_socket(vps)
    with s, pytest.raises(OSError):
        s.connect((HOME, 443))  # no route from the internet side
    https_get(vps, "social.example.org")  # plus whatever the tests before this one received
    assert not any(HOME.encode() in r for r in vps.received)


def test_200_udp_clients_over_the_range_cost_one_descriptor_each(vps: Vps) -> None:
    def fds() -> int:
        return len(os.listdir(f"/proc/{vps.edge_pid}/fd"))

    def rss_kib() -> int:
        return int(Path(f"/proc/{vps.edge_pid}/statm").read_text().split()[1]) * 4

    before_sessions = int(vps.status()["udp_sessions"])  # type: ignore[call-overload]
    fd0, rss0 = steady_fds(vps.edge_pid), rss_kib()  # (once the admin API's connection is closed)
    clients = [client_socket(vps, socket.SOCK_DGRAM, src=(CLIENT_A, CLIENT_B)[i % 2]) for i in range(200)]
    try:
        for i, c in enumerate(clients):  # each on its own port of the range
            c.sendto(b"x%d" % i, (EDGE_PUBLIC, 49152 + i))
        for i, c in enumerate(clients):
            assert c.recvfrom(100)[0] == b"x%d" % i
        fd1, rss1 = fds(), rss_kib()
        st = vps.status()
        sessions = int(st["udp_sessions"]) - before_sessions  # type: ignore[call-overload]
        print(f"\n200 UDP clients over 200 ports of the range: {sessions} new sessions, "
              f"{fd1 - fd0} more descriptors, RSS +{rss1 - rss0} KiB")
        assert sessions == 200
        assert fd1 - fd0 == 200  # one connected upstream socket per session, nothing per port
        assert rss1 - rss0 < 10 * 1024
    finally:
        for c in clients:
            c.close()
