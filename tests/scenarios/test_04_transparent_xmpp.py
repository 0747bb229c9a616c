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

from netns import Topology, ns, running
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


@contextlib.contextmanager
def namespaces() -> Iterator[None]:
    with Topology() as topo:
        for n in (CLIENT, EDGE, UP):
            topo.add(n)
        topo.link(CLIENT, EDGE, [f"{ATTACKER}/24", f"{ALICE}/24"], [f"{E4C}/24"])
        topo.link(EDGE, UP, [f"{E4U}/24"], [f"{U4}/24"])
        ns(UP, "ip", "route", "add", "default", "via", E4U)
        yield


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
    with namespaces(), running(UP, [exe, "--config", str(cfg), "-F"], root / "prosody.out"), \
            running(EDGE, [*EDGEWARD, "run", str(edge_cfg)], tmp_path / "edge.log") as edge:
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
