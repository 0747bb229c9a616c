"""Transparent source (IP_TRANSPARENT), in network namespaces this test creates.

Three namespaces joined by veth pairs, all traffic inside them:

    client 10.81.1.2 / fd81:1::2 ── 10.81.1.1 / fd81:1::1  edge  10.81.2.1 / fd81:2::1 ── 10.81.2.2 / fd81:2::2 upstream

The upstream's routes to client addresses go through the edge (its default route), as
transparent mode needs; the edge does not forward (ip_forward stays 0). Debian's nginx on the
upstream logs `$remote_addr` with no PROXY header or X-Forwarded-For, and a UDP echo there
answers with the source address it saw. `edgeward nft` provides the edge's return path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import Topology, ns, running
from support import ROOT, free_port, require, wait_until

pytestmark = pytest.mark.netns

EDGEWARD = [sys.executable, "-m", "edgeward.cli"]
TAG = f"{os.getpid() % 100000}"
CLIENT, EDGE, UP = f"ewt-c{TAG}", f"ewt-e{TAG}", f"ewt-u{TAG}"
C4, E4C, E4U, U4 = "10.81.1.2", "10.81.1.1", "10.81.2.1", "10.81.2.2"
C6, E6C, E6U, U6 = "fd81:1::2", "fd81:1::1", "fd81:2::1", "fd81:2::2"
HTTP_PORT, UDP_PORT = 8080, 5353


@pytest.fixture(scope="module")
def namespaces() -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        if os.environ.get("CI"):
            pytest.fail("network namespace tests need root and iproute2")
        pytest.skip("needs root and iproute2")
    require("nft")
    with Topology() as topo:
        for n in (CLIENT, EDGE, UP):
            topo.add(n)
        topo.link(CLIENT, EDGE, [f"{C4}/24", f"{C6}/64"], [f"{E4C}/24", f"{E6C}/64"])
        topo.link(EDGE, UP, [f"{E4U}/24", f"{E6U}/64"], [f"{U4}/24", f"{U6}/64"])
        # Client addresses are reached through the edge: the upstream's default route.
        ns(UP, "ip", "route", "add", "default", "via", E4U)
        ns(UP, "ip", "-6", "route", "add", "default", "via", E6U)
        assert ns(EDGE, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
        yield


def listening(name: str, proto: str, port: int) -> bool:
    out = ns(name, "ss", "-Hln" + ("t" if proto == "tcp" else "u"), f"sport = :{port}", check=False).stdout
    return bool(out.strip())


UDP_ECHO = textwrap.dedent("""
    import select, socket, sys
    socks = []
    for fam, host in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((host, int(sys.argv[3])))
        socks.append(s)
    while True:
        for s in select.select(socks, [], [])[0]:
            data, addr = s.recvfrom(2048)
            s.sendto(b"seen " + addr[0].encode() + b" " + data, addr)
""")

UDP_CLIENT = textwrap.dedent("""
    import socket, sys
    fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
    print(s.recv(2048).decode())
""")


@pytest.fixture(scope="module")
def upstreams(namespaces: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    exe = require("nginx")
    tmp = tmp_path_factory.mktemp("transparent-up")
    prefix = tmp / "nginx"
    for d in ("logs", "tmp"):
        (prefix / d).mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    log_format peer '$remote_addr "$request" $status';
    access_log {prefix}/logs/access.log peer;
    server {{
        listen {U4}:{HTTP_PORT};
        listen [{U6}]:{HTTP_PORT};
        location / {{ return 200 "remote_addr=$remote_addr\\n"; }}
    }}
}}
""")
    with running(UP, [exe, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs/error.log")],
                    tmp / "nginx.out"), \
            running(UP, [sys.executable, "-c", UDP_ECHO, U4, U6, str(UDP_PORT)], tmp / "udp.out"):
        assert wait_until(lambda: listening(UP, "tcp", HTTP_PORT) and listening(UP, "udp", UDP_PORT), 10)
        yield prefix / "logs" / "access.log"


CONFIG = f"""
[pools.web]
servers = ["{U4}:{HTTP_PORT}"]
transparent = true

[pools.web6]
servers = ["[{U6}]:{HTTP_PORT}"]
transparent = true

[services.web]
listen = ["{E4C}:{HTTP_PORT}"]
to = "web"

[services.web6]
listen = ["[{E6C}]:{HTTP_PORT}"]
to = "web6"

[services.echo]
listen = ["udp/{E4C}:{UDP_PORT}", "udp/[{E6C}]:{UDP_PORT}"]
to = "echo"

[pools.echo]
servers = ["{U4}", "[{U6}]"]
transparent = true
balance = "source-hash"
"""


def edge_config(tmp: Path) -> Path:
    cfg = tmp / "edge.toml"
    cfg.write_text(f'[edge]\nadmin = "unix:{tmp}/admin.sock"\nstate_dir = "{tmp}/state"\n' + CONFIG)
    return cfg


def curl(url: str, timeout: int = 5) -> subprocess.CompletedProcess[str]:
    return ns(CLIENT, "curl", "-sS", "-g", "--max-time", str(timeout), url, check=False)


def test_upstreams_see_the_clients_own_address(upstreams: Path, tmp_path: Path) -> None:
    require("curl")
    cfg = edge_config(tmp_path)
    with running(EDGE, [*EDGEWARD, "run", str(cfg)], tmp_path / "edge.log") as edge:
        assert wait_until(lambda: (tmp_path / "admin.sock").exists() or edge.poll() is not None, 15)
        assert edge.poll() is None, (tmp_path / "edge.log").read_text()
        # Without the return path, the upstream's replies to the client's address never reach the
        # edge's socket: the connection cannot complete.
        assert curl(f"http://{E4C}:{HTTP_PORT}/", timeout=2).returncode != 0
        script = subprocess.run([*EDGEWARD, "nft", str(cfg)], capture_output=True, text=True, timeout=30, check=True,
                                cwd=ROOT).stdout
        applied = ns(EDGE, "sh", "-c", script, check=False)
        assert applied.returncode == 0, applied.stderr
        try:
            r = curl(f"http://{E4C}:{HTTP_PORT}/")
            assert r.stdout == f"remote_addr={C4}\n", r.stderr
            r6 = curl(f"http://[{E6C}]:{HTTP_PORT}/")
            assert r6.stdout == f"remote_addr={C6}\n", r6.stderr
            # nginx writes its access-log line after the response is sent: wait for it.
            def logged() -> bool:
                log = upstreams.read_text()
                return f'{C4} "GET / HTTP/1.1" 200' in log and f'{C6} "GET / HTTP/1.1" 200' in log
            assert wait_until(logged, 5), upstreams.read_text()
            for server in (E4C, E6C):
                u = ns(CLIENT, sys.executable, "-c", UDP_CLIENT, server, str(UDP_PORT), check=False)
                client_ip = C4 if ":" not in server else C6
                assert u.stdout.strip() == f"seen {client_ip} ping", u.stderr
            # Running the script again replaces what it made (no duplicate rules).
            assert ns(EDGE, "sh", "-c", script, check=False).returncode == 0
            assert ns(EDGE, "ip", "-4", "rule", "show").stdout.count("fwmark 0x7e") == 1
            assert curl(f"http://{E4C}:{HTTP_PORT}/").stdout == f"remote_addr={C4}\n"
        finally:
            ns(EDGE, "nft", "delete", "table", "inet", "edgeward_transparent", check=False)
        assert edge.poll() is None


def test_refuses_to_start_without_cap_net_admin(tmp_path: Path) -> None:
    setpriv = require("setpriv")
    up = free_port()
    port = free_port()
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f"""[edge]
admin = "unix:{tmp_path}/admin.sock"
state_dir = "{tmp_path}/state"

[pools.web]
servers = ["127.0.0.1:{up}"]
transparent = true

[services.web]
listen = ["127.0.0.1:{port}"]
to = "web"
""")
    dropped = subprocess.run([setpriv, "--bounding-set", "-net_admin,-net_raw", *EDGEWARD, "run", str(cfg)],
                             capture_output=True, text=True, timeout=30)
    assert dropped.returncode == 1
    assert "transparent upstream connections (services.web) need CAP_NET_ADMIN" in dropped.stderr, dropped.stderr
    # The same config starts with the capability (the check is not a blanket refusal).
    with subprocess.Popen([*EDGEWARD, "run", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as p:
        try:
            assert wait_until(lambda: (tmp_path / "admin.sock").exists() or p.poll() is not None, 15)
            assert p.poll() is None
        finally:
            p.terminate()
            p.wait(10)


def test_nft_prints_rules_only_for_transparent_services(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text('[services.plain]\nlisten = ["127.0.0.1:9"]\nto = "127.0.0.1:10"\n')
    out = subprocess.run([*EDGEWARD, "nft", str(cfg)], capture_output=True, text=True, timeout=30, check=True).stdout
    assert "no service asks for it" in out and "nft -f" not in out
    cfg.write_text(CONFIG)
    out = subprocess.run([*EDGEWARD, "nft", str(cfg), "--mark", "0x10", "--table", "77"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert f"ip saddr {{ {U4} }} socket transparent 1 meta mark set 0x10" in out
    assert f"ip6 saddr {{ {U6} }} socket transparent 1 meta mark set 0x10" in out
    assert "ip -6 route replace local ::/0 dev lo table 77" in out
    bad = subprocess.run([*EDGEWARD, "nft", str(cfg), "--mark", "lots"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "not a number" in bad.stderr
    time.sleep(0)  # nothing started: nothing to stop


def test_readme_example_as_written(upstreams: Path, tmp_path: Path) -> None:
    """The README's "Transparent mode" config and its edge-side step, with the addresses moved into
    the namespaces (the upstream's default route via the edge is the fixture's)."""
    import re
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Transparent mode"):]
    toml = re.search(r"```toml\n(.*?)```", section, re.S)
    step = re.search(r"```sh\n(.*?)\n", section, re.S)
    assert toml is not None and step is not None
    (tmp_path / "edge.toml").write_text(
        f'[edge]\nadmin = "unix:{tmp_path}/admin.sock"\nstate_dir = "{tmp_path}/state"\n'
        + toml.group(1).replace("192.168.1.20:80", f"{U4}:{HTTP_PORT}").replace("0.0.0.0:80", f"{E4C}:{HTTP_PORT}"))
    command = step.group(1).split("#")[0].strip()
    assert command == "edgeward nft edge.toml | sh"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with running(EDGE, [*EDGEWARD, "run", str(tmp_path / "edge.toml")], tmp_path / "edge.log") as edge:
        assert wait_until(lambda: (tmp_path / "admin.sock").exists() or edge.poll() is not None, 15)
        done = subprocess.run(["ip", "netns", "exec", EDGE, "sh", "-c", command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        try:
            assert curl(f"http://{E4C}:{HTTP_PORT}/").stdout == f"remote_addr={C4}\n"
        finally:
            ns(EDGE, "nft", "delete", "table", "inet", "edgeward_transparent", check=False)
