"""UDP forwarding by session, against real sockets on 127.0.0.0/8.

Replies reach the right client from the address it sent to; many clients keep separate
sessions; idle sessions expire and free their descriptors; a port range forwarded to the
same ports stays within live sessions + listeners descriptors; source hash keeps a client on
one server; bans drop datagrams and close sessions; garbage and oversized datagrams harm
nothing; session caps refuse and count; a reload leaves live sessions on their runtime.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import (
    EdgeProcess,
    ThreadServer,
    UdpEcho,
    echo_handler,
    fds_besides_pipe_pool,
    free_port,
    wait_port,
)


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_udp_range(n: int, hosts: tuple[str, ...], tcp: bool = False) -> int:
    """A first port such that first..first+n-1 are free for UDP (and TCP) on every host."""
    kinds = (socket.SOCK_DGRAM, socket.SOCK_STREAM) if tcp else (socket.SOCK_DGRAM,)
    for _ in range(50):
        first = random.randrange(20000, 60000 - n)
        held: list[socket.socket] = []
        try:
            for h in hosts:
                for p in range(first, first + n):
                    for kind in kinds:
                        s = socket.socket(socket.AF_INET, kind)
                        held.append(s)
                        s.bind((h, p))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free UDP port range")


def client(port: int, src: str = "127.0.0.1", dst: str = "127.0.0.1") -> socket.socket:
    """A connected client socket: it only accepts replies from the address it sends to."""
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind((src, 0))
    c.connect((dst, port))
    c.settimeout(3)
    return c


def ask(c: socket.socket, data: bytes, timeout: float = 3.0) -> bytes | None:
    c.settimeout(timeout)
    c.send(data)
    try:
        return c.recv(65535)
    except TimeoutError:
        return None


def wait_until(pred: Callable[[], bool], timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@contextlib.contextmanager
def edge_with(tmp: Path, config: str, udp_port: int | None = None, admin_port: int | None = None) -> Iterator[EdgeProcess]:
    e = EdgeProcess(tmp, config, admin_port=admin_port)
    try:
        if udp_port is not None:
            wait_udp(udp_port)
        yield e
    finally:
        e.stop()


def wait_udp(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Wait until something is bound on UDP host:port (binding it ourselves fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return
        time.sleep(0.05)
    raise TimeoutError(f"udp {host}:{port} not bound")


def services(e: EdgeProcess) -> dict[str, dict[str, object]]:
    return e.status()["services"]  # type: ignore[return-value]


def test_replies_reach_the_right_client_with_tcp_on_the_same_port(tmp_path: Path) -> None:
    port = free_udp_range(1, ("127.0.0.1", "127.0.0.2"), tcp=True)
    udp_up = UdpEcho("127.0.0.2", [port], tag="U")
    tcp_up = ThreadServer(echo_handler(), "127.0.0.2", port)
    with edge_with(tmp_path, f"""
[services.turn]
listen = ["127.0.0.1:{port}", "udp/127.0.0.1:{port}"]   # TCP and UDP on one port
to = "127.0.0.2"                                        # the same port on the upstream
""", port) as e:
        try:
            wait_port("127.0.0.1", port)
            a, b = client(port, "127.0.0.21"), client(port, "127.0.0.22")
            for i in range(3):
                ra, rb = ask(a, b"from-a-%d" % i), ask(b, b"from-b-%d" % i)
                assert ra is not None and ra.endswith(b"|from-a-%d" % i)
                assert rb is not None and rb.endswith(b"|from-b-%d" % i)
            # One upstream source port per client: the upstream can tell the clients apart.
            assert len({p for p in udp_up.peers}) == 2
            with socket.create_connection(("127.0.0.1", port), timeout=3) as t:
                t.sendall(b"tcp")
                assert t.recv(3) == b"tcp"
            st = e.status()
            assert st["udp_sessions"] == 2
            svc = services(e)["turn"]
            assert svc["udp_sessions"] == 2 and svc["udp_sessions_total"] == 2
            assert svc["datagrams_in"] == 6 and svc["datagrams_out"] == 6
            assert svc["bytes_in"] >= 6 * 8 + 3 and svc["bytes_out"] >= 6 * 8 + 3
            (server,) = st["pools"]["service:turn"]["servers"]  # type: ignore[index]
            assert server["udp_sessions"] == 2
            assert {"transport": "udp", "address": f"127.0.0.1:{port}", "name": f"udp/127.0.0.1:{port}",
                    "active": 2} in st["listeners"]  # type: ignore[operator]
            code, metrics = e.api("GET", "/metrics")
            assert code == 200 and isinstance(metrics, str)
            assert "edgeward_udp_sessions 2" in metrics
            assert 'edgeward_service_udp_sessions{service="turn"} 2' in metrics
            assert 'edgeward_service_received_datagrams_total{service="turn"} 6' in metrics
            a.close()
            b.close()
        finally:
            udp_up.close()
            tcp_up.close()


def test_many_clients_keep_separate_sessions(tmp_path: Path) -> None:
    port = free_udp_port()
    up = UdpEcho(tag="U")
    with edge_with(tmp_path, f"""
[services.media]
listen = ["udp/127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
""", port) as e:
        clients = [client(port, f"127.0.0.{10 + i % 5}") for i in range(200)]
        try:
            seen: dict[int, set[bytes]] = {}
            for rnd in range(3):
                for batch in range(0, 200, 50):  # bursts of 50: well within default socket buffers
                    for i in range(batch, batch + 50):
                        clients[i].send(b"c%d-r%d" % (i, rnd))
                    for i in range(batch, batch + 50):
                        reply = clients[i].recv(65535)
                        _tag, _lport, peer, payload = reply.split(b"|", 3)
                        assert payload == b"c%d-r%d" % (i, rnd), "a reply reached the wrong client"
                        seen.setdefault(i, set()).add(peer)
            # Each client kept one upstream socket over its datagrams; no two clients shared one.
            assert all(len(p) == 1 for p in seen.values())
            assert len({next(iter(p)) for p in seen.values()}) == 200
            assert e.status()["udp_sessions"] == 200
            assert e.status()["clients"] == 5
            assert services(e)["media"]["datagrams_out"] == 600
        finally:
            for c in clients:
                c.close()
            up.close()


def test_idle_sessions_expire_and_free_their_descriptors(tmp_path: Path) -> None:
    port = free_udp_port()
    up = UdpEcho()
    with edge_with(tmp_path, f"""
[listeners.media]
bind = ["udp/127.0.0.1:{port}"]
udp_idle_timeout = "1s"
[services.media]
listen = ["media"]
to = "127.0.0.1:{up.port}"
""", port) as e:
        clients = [client(port, "127.0.0.31") for _ in range(50)]
        try:
            base = fds_besides_pipe_pool(e)
            for c in clients:
                assert ask(c, b"x") == b"x"
            assert e.status()["udp_sessions"] == 50
            assert fds_besides_pipe_pool(e) == base + 50
            assert wait_until(lambda: e.status()["udp_sessions"] == 0), "sessions did not expire"
            assert fds_besides_pipe_pool(e) == base
            assert e.counter("closed", "media", "udp_idle") == 50
            # A client that comes back after expiry simply gets a new session.
            assert ask(clients[0], b"again") == b"again"
            assert services(e)["media"]["udp_sessions_total"] == 51
        finally:
            for c in clients:
                c.close()
            up.close()


def test_port_range_to_same_ports_keeps_descriptors_bounded(tmp_path: Path) -> None:
    n = 200
    first = free_udp_range(n, ("127.0.0.1", "127.0.0.2"))
    ports = list(range(first, first + n))
    up = UdpEcho("127.0.0.2", ports, tag="H")
    with edge_with(tmp_path, f"""
[listeners.relay]
bind = ["udp/127.0.0.1:{first}-{first + n - 1}"]
udp_idle_timeout = "2s"
[services.relay]
listen = ["relay"]
to = "127.0.0.2"                        # the port each datagram came to
""", first) as e:
        for p in ports:
            wait_udp(p)
        base = fds_besides_pipe_pool(e)
        assert base < n + 40, "listening descriptors beyond one per port"
        # Three clients on every port: one client socket each, so one session per (client, port).
        cs = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for i, c in enumerate(cs):
                c.bind((f"127.0.0.{40 + i}", 0))
                c.settimeout(3)
            got: dict[tuple[int, int], bytes] = {}
            for batch in range(0, n, 25):  # bursts of 25 ports: well within default socket buffers
                for p in ports[batch:batch + 25]:
                    for i, c in enumerate(cs):
                        c.sendto(b"c%d" % i, ("127.0.0.1", p))
                for i, c in enumerate(cs):
                    for _ in ports[batch:batch + 25]:
                        data, src = c.recvfrom(65535)
                        got[(i, src[1])] = data
            assert len(got) == 3 * n
            for (i, p), data in got.items():
                tag, lport, _peer, payload = data.split(b"|", 3)
                assert (tag, int(lport), payload) == (b"H", p, b"c%d" % i), "reached the wrong port or client"
            st = e.status()
            assert st["udp_sessions"] == 3 * n
            assert fds_besides_pipe_pool(e) == base + 3 * n  # one upstream socket per live session, no more
            assert wait_until(lambda: e.status()["udp_sessions"] == 0, 10)
            assert fds_besides_pipe_pool(e) == base
        finally:
            for c in cs:
                c.close()
            up.close()


def test_source_hash_keeps_a_client_on_one_server(tmp_path: Path) -> None:
    port, up_port = free_udp_port(), free_port()
    a, b = UdpEcho("127.0.0.3", [up_port], tag="A"), UdpEcho("127.0.0.4", [up_port], tag="B")
    with edge_with(tmp_path, f"""
[pools.bridges]
servers = ["127.0.0.3:{up_port}", "127.0.0.4:{up_port}"]
balance = "source-hash"
[services.media]
listen = ["udp/127.0.0.1:{port}"]
to = "bridges"
""", port) as e:
        try:
            where: dict[str, set[bytes]] = {}
            for i in range(30):
                src = f"127.0.0.{100 + i}"
                for _ in range(3):  # three source ports: three sessions, one server
                    with client(port, src) as c:
                        reply = ask(c, b"hi")
                        assert reply is not None
                        where.setdefault(src, set()).add(reply.split(b"|", 1)[0])
            assert all(len(s) == 1 for s in where.values()), where
            assert {t for s in where.values() for t in s} == {b"A", b"B"}
            servers = e.status()["pools"]["bridges"]["servers"]  # type: ignore[index]
            assert sum(s["udp_sessions"] for s in servers) == 90
        finally:
            a.close()
            b.close()


def test_ban_drops_datagrams_and_closes_sessions(tmp_path: Path) -> None:
    port = free_udp_port()
    up = UdpEcho()
    with edge_with(tmp_path, f"""
[services.media]
listen = ["udp/127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
""", port) as e:
        bad, good = client(port, "127.0.0.66"), client(port, "127.0.0.67")
        try:
            assert ask(bad, b"before") == b"before"
            assert ask(good, b"ok") == b"ok"
            code, _ = e.api("POST", "/ban", {"jail": "manual", "addr": "127.0.0.66"})
            assert code == 200
            assert wait_until(lambda: e.status()["udp_sessions"] == 1), "the banned address kept its session"
            assert e.counter("closed", f"udp/127.0.0.1:{port}", "banned") == 1
            assert ask(bad, b"after", timeout=0.5) is None
            with client(port, "127.0.0.66") as other_port:
                assert ask(other_port, b"new", timeout=0.5) is None
            assert e.counter("refused", f"udp/127.0.0.1:{port}", "banned") >= 2
            assert ask(good, b"still") == b"still"
            e.api("POST", "/unban", {"addr": "127.0.0.66"})
            assert wait_until(lambda: ask(bad, b"back", timeout=0.3) == b"back")
        finally:
            bad.close()
            good.close()
            up.close()


def test_garbage_empty_and_oversized_datagrams(tmp_path: Path) -> None:
    port, dead_port = free_udp_port(), free_udp_port()
    dead = free_udp_port()  # nothing listens there: the upstream answers with ICMP port unreachable
    up = UdpEcho()
    with edge_with(tmp_path, f"""
[services.media]
listen = ["udp/127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
[services.dead]
listen = ["udp/127.0.0.1:{dead_port}"]
to = "127.0.0.1:{dead}"
""", port) as e:
        c = client(port, "127.0.0.51")
        try:
            base = fds_besides_pipe_pool(e)
            assert ask(c, b"") == b""
            big = os.urandom(65507)  # the largest IPv4 UDP payload
            assert ask(c, big) == big
            rnd = random.Random(7)
            for _ in range(300):
                junk = rnd.randbytes(rnd.randrange(0, 2000))
                assert ask(c, junk) == junk
            with client(dead_port, "127.0.0.52") as d:
                for _ in range(20):
                    with contextlib.suppress(OSError):
                        d.send(b"anyone?")
                    time.sleep(0.01)
            assert ask(c, b"alive") == b"alive"
            assert e.proc.poll() is None
            assert e.counter("udp_dropped", f"udp/127.0.0.1:{dead_port}", "upstream_econnrefused") >= 1
            assert fds_besides_pipe_pool(e) == base + 2  # two live sessions: this client and the dead service
        finally:
            c.close()
            up.close()


def test_session_caps_refuse_and_count(tmp_path: Path) -> None:
    port = free_udp_port()
    up = UdpEcho()
    admin = free_port()
    with edge_with(tmp_path, f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"
max_udp_sessions = 5
max_udp_sessions_per_client = 3
[services.media]
listen = ["udp/127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"
""", port, admin_port=admin) as e:
        held: list[socket.socket] = []
        try:
            def served(src: str) -> bool:
                c = client(port, src)
                held.append(c)
                return ask(c, b"x", timeout=0.7) == b"x"
            assert [served("127.0.0.71") for _ in range(4)] == [True, True, True, False]
            assert [served("127.0.0.72") for _ in range(3)] == [True, True, False]  # 5 in all
            name = f"udp/127.0.0.1:{port}"
            assert e.counter("refused", name, "udp_client_limit") == 1
            assert e.counter("refused", name, "udp_global_limit") == 1
            held[3].send(b"again")  # every refused datagram is counted (the global cap is checked first)
            assert wait_until(lambda: e.counter("refused", name, "udp_global_limit") == 2)
            assert e.status()["udp_sessions"] == 5
        finally:
            for c in held:
                c.close()
            up.close()


def test_wildcard_bind_replies_from_the_address_the_client_used(tmp_path: Path) -> None:
    port = free_udp_port("0.0.0.0")
    up = UdpEcho()
    with edge_with(tmp_path, f"""
[services.media]
listen = ["udp/0.0.0.0:{port}"]
to = "127.0.0.1:{up.port}"
""", port) as e:
        try:
            # Connected clients drop replies from any other source address than the one they used.
            for dst in ("127.0.0.5", "127.0.0.6", "127.0.0.1"):
                with client(port, "127.0.0.81", dst) as c:
                    assert ask(c, dst.encode()) == dst.encode(), f"no reply from {dst}"
            assert e.status()["udp_sessions"] == 3
        finally:
            up.close()


def test_dual_stack_wildcard_bind_answers_ipv4_from_the_address_used(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    port = free_udp_port("0.0.0.0")
    up = UdpEcho()
    with edge_with(tmp_path, f"""
[services.media]
listen = ["udp/[::]:{port}"]
to = "127.0.0.1:{up.port}"
""") as e:
        try:
            wait_udp(port, "0.0.0.0")
            with client(port, "127.0.0.82", "127.0.0.7") as c4:
                assert ask(c4, b"v4") == b"v4"
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as c6:
                c6.connect(("::1", port))
                assert ask(c6, b"v6") == b"v6"
            assert e.status()["clients"] == 2  # the IPv4 client is counted as 127.0.0.82, not ::ffff:
        finally:
            up.close()


def test_reload_keeps_live_sessions_on_their_upstream(tmp_path: Path) -> None:
    port = free_udp_port()
    a, b = UdpEcho(tag="A"), UdpEcho(tag="B")
    cfg = """
[services.media]
listen = ["udp/127.0.0.1:{port}"]
to = "127.0.0.1:{up}"
"""
    with edge_with(tmp_path, cfg.format(port=port, up=a.port), port) as e:
        old = client(port, "127.0.0.91")
        try:
            reply = ask(old, b"1")
            assert reply is not None and reply.startswith(b"A|")
            e.write_config(cfg.format(port=port, up=b.port))
            e.signal(signal.SIGHUP)
            assert wait_until(lambda: e.status()["reloads"] == 1)
            with client(port, "127.0.0.92") as new:
                reply = ask(new, b"2")
                assert reply is not None and reply.startswith(b"B|")
            reply = ask(old, b"3")
            assert reply is not None and reply.startswith(b"A|"), "a live session changed upstream on reload"
            # Removing the UDP address closes its sessions and frees the port.
            e.write_config(f"""
[services.other]
listen = ["127.0.0.1:{free_port()}"]
to = "127.0.0.1:1"
""")
            e.signal(signal.SIGHUP)
            assert wait_until(lambda: e.status()["reloads"] == 2)
            assert e.status()["udp_sessions"] == 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", port))
        finally:
            old.close()
            a.close()
            b.close()


def test_clients_of_a_server_marked_down_move_on_their_next_datagram(tmp_path: Path) -> None:
    port, up_port, health_port = free_udp_port(), free_port(), free_port()
    a, b = UdpEcho("127.0.0.3", [up_port], tag="A"), UdpEcho("127.0.0.4", [up_port], tag="B")
    checks = {h: ThreadServer(lambda c: None, h, health_port) for h in ("127.0.0.3", "127.0.0.4")}
    with edge_with(tmp_path, f"""
[pools.bridges]
servers = ["127.0.0.3:{up_port}", "127.0.0.4:{up_port}"]
balance = "source-hash"
health = {{ port = {health_port}, interval = "200ms", timeout = "1s" }}  # (A refuses at once)
[services.media]
listen = ["udp/127.0.0.1:{port}"]
to = "bridges"
""", port) as e:
        cs = [client(port, f"127.0.0.{150 + i}") for i in range(20)]
        try:
            first = {}
            for c in cs:
                reply = ask(c, b"x")
                assert reply is not None
                first[c] = reply[:1]
            on_a = [c for c in cs if first[c] == b"A"]
            assert on_a and len(on_a) < len(cs)
            checks["127.0.0.3"].close()  # A fails its health check
            assert wait_until(lambda: not e.status()["pools"]["bridges"]["servers"][0]["available"])  # type: ignore[index]
            for c in cs:
                reply = ask(c, b"y")
                assert reply is not None and reply[:1] == b"B", "a client stayed on a down server"
            assert e.counter("closed", f"udp/127.0.0.1:{port}", "udp_moved") == len(on_a)
            assert e.status()["udp_sessions"] == len(cs)
        finally:
            for c in cs:
                c.close()
            checks["127.0.0.4"].close()
            a.close()
            b.close()
