"""Scenario 05, the kernel fast path: services with forward = "kernel" become nftables DNAT in
the edge's namespace and never enter edgeward. Three namespaces (internet client, VPS edge, home
server whose way back is the tunnel), edgeward running in the edge one:

- UDP (a port and a range) and TCP reach home with the client's own address, answered from the
  edge's address; edgeward has no socket on those ports, and traffic keeps flowing while the
  edgeward process is frozen (SIGSTOP): no process in the path;
- masquerade where asked: that upstream sees the edge's tunnel address;
- a ban (admin API) drops the client's packets in the kernel ([guard.nft], before DNAT); unban
  lets them through again;
- a reload that removes a port removes its rule; stopping edgeward removes its table.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeward.admin.client import admin_request
from netns import Topology, UdpEchoes, in_netns, require_netns, run_in, sh
from support import ThreadServer, require

ROOT = Path(__file__).resolve().parents[2]
EDGE_PUBLIC, CLIENT_A, CLIENT_B = "198.51.100.1", "198.51.100.2", "198.51.100.3"
EDGE_TUNNEL, HOME = "10.8.0.1", "10.8.0.2"
RANGE = range(49152, 49161)


def config(tmp: Path, admin: str, with_range: bool = True) -> str:
    udp = ['"udp/[::]:3478"'] + (['"udp/[::]:49152-49160"'] if with_range else [])
    return f"""
[edge]
admin = {json.dumps(admin)}
state_dir = "{tmp / 'state'}"

[guard.nft]
enabled = true

[services.turn-udp]
listen = [{", ".join(udp)}]
to = "{HOME}"
forward = "kernel"

[services.xmpp]
listen = ["[::]:5222"]
to = "{HOME}"
forward = "kernel"

[services.web]
listen = ["[::]:443"]
to = "{HOME}:8443"
forward = "kernel"
masquerade = true
"""


def peer_handler(c: socket.socket) -> None:
    c.sendall(f"peer={c.getpeername()[0]}".encode())


@dataclass
class Vps:
    client: str
    edge: str
    edge_proc: subprocess.Popen[bytes]
    admin: str
    tmp: Path

    def api(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        return admin_request(method, path, self.admin, None, body)  # type: ignore[no-any-return]

    def nft_table(self) -> str:
        return subprocess.run(["ip", "netns", "exec", self.edge, "nft", "list", "ruleset"], capture_output=True,
                              text=True, timeout=20).stdout


def start_edge(edge: str, tmp: Path) -> subprocess.Popen[bytes]:
    """edgeward with tmp/edge.toml in the edge namespace, once its admin socket is up."""
    (tmp / "admin.sock").unlink(missing_ok=True)
    exe = ROOT / ".venv/bin/edgeward"
    with open(tmp / "edge.log", "ab") as log:
        proc = run_in(edge, [str(exe) if exe.exists() else "edgeward", "run", str(tmp / "edge.toml")],
                      stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 20
    while not (tmp / "admin.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            raise AssertionError((tmp / "edge.log").read_text())
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def vps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vps]:
    require_netns()
    require("nft")
    tmp = tmp_path_factory.mktemp("kernel-path")
    topo = Topology()
    tag = f"ewk{os.getpid() % 100000}"
    servers: list[ThreadServer | UdpEchoes] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        client, edge, home = topo.add(f"{tag}-c"), topo.add(f"{tag}-e"), topo.add(f"{tag}-h")
        topo.link(client, edge, [f"{CLIENT_A}/24", f"{CLIENT_B}/24"], [f"{EDGE_PUBLIC}/24"])
        topo.link(edge, home, [f"{EDGE_TUNNEL}/24"], [f"{HOME}/24"])
        sh("ip", "-n", home, "route", "add", "default", "via", EDGE_TUNNEL)  # home's way back: the tunnel
        sh("ip", "netns", "exec", edge, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        with in_netns(home):
            servers += [ThreadServer(peer_handler, host=HOME, port=p) for p in (5222, 8443)]
            servers.append(UdpEchoes(HOME, (3478, *RANGE), reply=lambda _data, peer: f"peer={peer[0]}".encode()))
        admin = f"unix:{tmp / 'admin.sock'}"
        (tmp / "edge.toml").write_text(config(tmp, admin))
        proc = start_edge(edge, tmp)
        running = Vps(client, edge, proc, admin, tmp)
        yield running
        proc = running.edge_proc  # a test may have started another
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for s in servers:
            s.close()
        topo.close()


def udp(vps: Vps, port: int, src: str = CLIENT_A, timeout: float = 2.0) -> tuple[bytes, tuple[str, int]] | None:
    with in_netns(vps.client):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.bind((src, 0))
        s.settimeout(timeout)
        s.sendto(b"hi", (EDGE_PUBLIC, port))
        try:
            data, addr = s.recvfrom(2048)
            return data, addr
        except TimeoutError:
            return None


def tcp(vps: Vps, port: int, src: str = CLIENT_A) -> bytes:
    with in_netns(vps.client):
        s = socket.socket()
    with s:
        s.bind((src, 0))
        s.settimeout(5)
        s.connect((EDGE_PUBLIC, port))
        return s.recv(100)


def eventually(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_udp_and_tcp_reach_home_with_the_clients_own_address(vps: Vps) -> None:
    for port in (3478, RANGE[0], RANGE[-1]):
        assert udp(vps, port) == (f"peer={CLIENT_A}".encode(), (EDGE_PUBLIC, port))
    assert udp(vps, 3478, src=CLIENT_B) == (f"peer={CLIENT_B}".encode(), (EDGE_PUBLIC, 3478))
    assert tcp(vps, 5222) == f"peer={CLIENT_A}".encode()
    assert tcp(vps, 443) == f"peer={EDGE_TUNNEL}".encode()  # masquerade = true
    st = vps.api("GET", "/status")[1]
    assert isinstance(st, dict) and st["kernel"] == {"table": "edgeward_fwd", "applied": True, "rules": 4}


def test_no_edgeward_process_is_in_the_path(vps: Vps) -> None:
    out = subprocess.run(["ip", "netns", "exec", vps.edge, "ss", "-Hanup"], capture_output=True, text=True,
                         timeout=20).stdout + subprocess.run(["ip", "netns", "exec", vps.edge, "ss", "-Hantp"],
                                                             capture_output=True, text=True, timeout=20).stdout
    assert not [line for line in out.splitlines() if any(f":{p} " in line for p in (3478, 5222, 443, *RANGE))]
    vps.edge_proc.send_signal(signal.SIGSTOP)
    try:
        assert udp(vps, 3478) == (f"peer={CLIENT_A}".encode(), (EDGE_PUBLIC, 3478))
        assert tcp(vps, 5222) == f"peer={CLIENT_A}".encode()
    finally:
        vps.edge_proc.send_signal(signal.SIGCONT)


def test_a_banned_client_is_dropped_in_the_kernel(vps: Vps) -> None:
    code, _ = vps.api("POST", "/ban", {"addr": CLIENT_A, "jail": "manual", "reason": "test"})
    assert code == 200
    try:
        assert eventually(lambda: udp(vps, 3478, timeout=0.3) is None)
        assert udp(vps, 3478, src=CLIENT_B) is not None  # others still served
        assert CLIENT_A in vps.nft_table()
    finally:
        vps.api("POST", "/unban", {"addr": CLIENT_A})
    assert eventually(lambda: udp(vps, 3478, timeout=0.3) is not None)


def test_a_reload_that_removes_a_port_removes_its_rule(vps: Vps) -> None:
    (vps.tmp / "edge.toml").write_text(config(vps.tmp, vps.admin, with_range=False))
    vps.edge_proc.send_signal(signal.SIGHUP)
    assert eventually(lambda: "49152" not in vps.nft_table())
    assert udp(vps, RANGE[3], timeout=0.5) is None
    assert udp(vps, 3478) is not None


def test_stopping_the_edge_removes_its_table(vps: Vps) -> None:
    vps.edge_proc.terminate()
    assert vps.edge_proc.wait(15) == 0
    assert "edgeward_fwd" not in vps.nft_table()


def test_a_table_left_by_a_killed_edge_goes_at_the_next_start(vps: Vps) -> None:
    """SIGKILL leaves the table behind (nothing can remove it); the next start removes it when its
    config forwards nothing in the kernel, by the name recorded in the state directory."""
    vps.edge_proc = start_edge(vps.edge, vps.tmp)
    assert "edgeward_fwd" in vps.nft_table()
    vps.edge_proc.kill()
    vps.edge_proc.wait(15)
    assert "edgeward_fwd" in vps.nft_table()  # still forwarding with no edgeward running
    assert udp(vps, 3478) is not None
    (vps.tmp / "edge.toml").write_text(config(vps.tmp, vps.admin).replace('forward = "kernel"', "")
                                       .replace("masquerade = true", ""))
    vps.edge_proc = start_edge(vps.edge, vps.tmp)
    assert "edgeward_fwd" not in vps.nft_table()
    assert not (vps.tmp / "state" / "kernel-table").exists()
