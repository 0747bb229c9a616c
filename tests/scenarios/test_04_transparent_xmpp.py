"""Scenario 04 over the XMPP port in transparent mode: Debian's prosody (0.12: no PROXY protocol)
behind the edge sees each client's own address because the edge connects from it (IP_TRANSPARENT),
so mod_log_auth names the attacker, and failed c2s logins made through the edge ban the attacker at
the edge. In network namespaces this test creates (like tests/integration/test_transparent.py):

    clients 10.83.1.2 (attacker), 10.83.1.3 (alice) ── 10.83.1.1 edge 10.83.2.1 ── 10.83.2.2 prosody
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from scenarios.prosody_peer import _config as prosody_config
from support import ROOT, require, wait_until

pytestmark = pytest.mark.netns

TAG = f"{os.getpid() % 100000}"
CLIENT, EDGE, UP = f"ewx-c{TAG}", f"ewx-e{TAG}", f"ewx-u{TAG}"
ATTACKER, ALICE, E4C, E4U, U4 = "10.83.1.2", "10.83.1.3", "10.83.1.1", "10.83.2.1", "10.83.2.2"
PORT = 5222
JID, PASSWORD = "alice@example.org", "secret"
EDGEWARD = [sys.executable, "-m", "edgeward.cli"]

# slixmpp through prosody_peer.xmpp_login, run inside the client namespace, aimed at the edge.
LOGIN = textwrap.dedent(f"""
    import sys
    sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT / "tests" / "scenarios")!r}]
    import prosody_peer

    class AtEdge(prosody_peer._BoundLoop):
        async def create_connection(self, factory, host=None, port=None, **kw):
            return await super().create_connection(factory, sys.argv[2], port, **kw)

    prosody_peer._BoundLoop = AtEdge
    print(prosody_peer.xmpp_login(sys.argv[1], {PORT}, sys.argv[3], sys.argv[4]))
""")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=check)


def ns(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", name, *args, check=check)


@contextlib.contextmanager
def namespaces() -> Iterator[None]:
    made: list[str] = []
    try:
        for n in (CLIENT, EDGE, UP):
            sh("ip", "netns", "add", n)
            made.append(n)
            ns(n, "ip", "link", "set", "lo", "up")
        for a, b, a_ns, b_ns in (("c0", "e0", CLIENT, EDGE), ("e1", "u0", EDGE, UP)):
            sh("ip", "link", "add", f"{a}{TAG}", "type", "veth", "peer", "name", f"{b}{TAG}")
            sh("ip", "link", "set", f"{a}{TAG}", "netns", a_ns)
            sh("ip", "link", "set", f"{b}{TAG}", "netns", b_ns)
        for n, dev, addrs in ((CLIENT, "c0", (ATTACKER, ALICE)), (EDGE, "e0", (E4C,)), (EDGE, "e1", (E4U,)),
                              (UP, "u0", (U4,))):
            for a in addrs:
                ns(n, "ip", "addr", "add", f"{a}/24", "dev", f"{dev}{TAG}")
            ns(n, "ip", "link", "set", f"{dev}{TAG}", "up")
        ns(UP, "ip", "route", "add", "default", "via", E4U)
        yield
    finally:
        for n in made:
            sh("ip", "netns", "del", n, check=False)


@contextlib.contextmanager
def in_ns(name: str, argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        p = subprocess.Popen(["ip", "netns", "exec", name, *argv], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.terminate()  # `ip netns exec` execs the program: this PID is the program
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def login(src: str, password: str) -> str:
    out = ns(CLIENT, sys.executable, "-c", LOGIN, src, E4C, JID, password, check=False)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else f"error: {out.stderr[-500:]}"


def listening(name: str, port: int) -> bool:
    return bool(ns(name, "ss", "-Hltn", f"sport = :{port}", check=False).stdout.strip())


def test_failed_logins_through_the_edge_ban_the_attacker(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        if os.environ.get("CI"):
            pytest.fail("network namespace tests need root and iproute2")
        pytest.skip("needs root and iproute2")
    exe, ctl = require("prosody"), require("prosodyctl")
    require("nft")
    root = tmp_path / "prosody"
    for d in ("data", "certs"):
        (root / d).mkdir(parents=True)
    cfg = root / "prosody.cfg.lua"
    cfg.write_text(prosody_config(root, PORT, "example.org").replace('"127.0.0.1"', f'"{U4}"'))
    subprocess.run([ctl, "--config", str(cfg), "register", "alice", "example.org", PASSWORD], check=True,
                   capture_output=True, timeout=20)
    prosody_log = root / "prosody.log"
    edge_cfg = tmp_path / "edge.toml"
    edge_cfg.write_text(f"""[edge]
admin = "unix:{tmp_path}/admin.sock"
state_dir = "{tmp_path}/state"

[pools.prosody]
servers = ["{U4}:{PORT}"]
transparent = true                # prosody 0.12 takes no PROXY header: it sees the client itself

[services.xmpp]
listen = ["{E4C}:{PORT}"]
to = "prosody"

[jails.prosody]
logpath = ["{prosody_log}"]
filter = "prosody-auth"
maxretry = 3
findtime = "5m"
bantime = "1h"
""")
    with namespaces(), in_ns(UP, [exe, "--config", str(cfg), "-F"], root / "prosody.out"), \
            in_ns(EDGE, [*EDGEWARD, "run", str(edge_cfg)], tmp_path / "edge.log") as edge:
        assert wait_until(lambda: listening(UP, PORT) and listening(EDGE, PORT), 20), \
            (root / "prosody.out").read_text() + (tmp_path / "edge.log").read_text()
        script = subprocess.run([*EDGEWARD, "nft", str(edge_cfg)], capture_output=True, text=True, check=True,
                                timeout=30).stdout
        assert ns(EDGE, "sh", "-c", script, check=False).returncode == 0
        assert login(ALICE, PASSWORD) == "True"
        assert login(ATTACKER, "wrong") == "False"
        assert login(ATTACKER, "wrong") == "False"
        # The third failure bans: the edge may close that very session before the client reads <failure/>.
        assert login(ATTACKER, "wrong") in ("False", "None")
        # prosody's own log names the attacker's address: no header told it.
        text = prosody_log.read_text()
        assert text.count(f"from IP: {ATTACKER}") == 3, text[-2000:]
        assert f"from IP: {E4U}" not in text
        # The edge read those lines and bans the attacker; alice is untouched.
        assert wait_until(lambda: login(ATTACKER, PASSWORD) == "None", 10)
        assert login(ALICE, PASSWORD) == "True"
        assert edge.poll() is None
        bans = subprocess.run([*EDGEWARD, "bans", "--admin", f"unix:{tmp_path}/admin.sock"], capture_output=True,
                              text=True, timeout=30)
        assert ATTACKER in bans.stdout and ALICE not in bans.stdout, bans.stdout + bans.stderr
