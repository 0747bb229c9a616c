"""nftables enforcement, tested inside network namespaces this test creates.

Two namespaces joined by a veth pair: the "edge" (10.200.77.1, where the
table is applied and a TCP server listens) and the "clients" (10.200.77.2 and
10.200.77.3). No traffic leaves them; the host's ruleset is never touched.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeward.config.loader import validate
from edgeward.config.schema import GuardSettings, JailSettings, NftSettings
from edgeward.guard.nft import render_changes, render_table
from edgeward.guard.service import Guard

EDGE, BANNED, OTHER = "10.200.77.1", "10.200.77.2", "10.200.77.3"
PORT = 7777


def test_render_table_and_changes() -> None:
    cfg = NftSettings(enabled=True, table="ew_test", hook="input", priority=-10)
    text = render_table(cfg, [("::ffff:192.0.2.1", None), ("2001:db8::1", 59.2), ("bogus", None)])
    assert "add table inet ew_test\ndelete table inet ew_test\n" in text
    assert "elements = { 192.0.2.1 }" in text
    assert "elements = { 2001:db8::1 timeout 60s }" in text
    assert "type filter hook input priority -10; policy accept;" in text
    assert "bogus" not in text
    changes = render_changes(cfg, [("192.0.2.2", 10.0)], ["2001:db8::1"])
    assert changes.splitlines() == [
        "add element inet ew_test banned6 { 2001:db8::1 }",
        "delete element inet ew_test banned6 { 2001:db8::1 }",
        "add element inet ew_test banned4 { 192.0.2.2 }",
        "delete element inet ew_test banned4 { 192.0.2.2 }",
        "add element inet ew_test banned4 { 192.0.2.2 timeout 10s }",
    ]
    assert render_changes(cfg, [], []) == ""
    with pytest.raises(ValueError):
        validate(NftSettings, {"hook": "output"})
    with pytest.raises(ValueError):
        validate(NftSettings, {"table": "x; flush ruleset"})


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    edge, clients = f"ewg-e-{os.getpid()}", f"ewg-c-{os.getpid()}"
    try:
        sh("ip", "netns", "add", edge)
        sh("ip", "netns", "add", clients)
        sh(
            "ip",
            "-n",
            edge,
            "link",
            "add",
            "ewa",
            "type",
            "veth",
            "peer",
            "name",
            "ewb",
            "netns",
            clients,
        )
        sh("ip", "-n", edge, "addr", "add", f"{EDGE}/24", "dev", "ewa")
        sh("ip", "-n", clients, "addr", "add", f"{BANNED}/24", "dev", "ewb")
        sh("ip", "-n", clients, "addr", "add", f"{OTHER}/24", "dev", "ewb")
        for ns, dev in ((edge, "ewa"), (clients, "ewb")):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        yield edge, clients
    finally:
        for ns in (edge, clients):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


SERVER = textwrap.dedent(
    f"""
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("{EDGE}", {PORT}))
    s.listen(64)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.sendall(b"hi")
        c.close()
    """
)

PROBE = textwrap.dedent(
    f"""
    import socket, sys
    s = socket.socket()
    s.settimeout(float(sys.argv[2]))
    s.bind((sys.argv[1], 0))
    try:
        s.connect(("{EDGE}", {PORT}))
        print("open" if s.recv(2) == b"hi" else "odd")
    except (TimeoutError, socket.timeout):
        print("dropped")
    except OSError as e:
        print("error", e)
    """
)


async def probe(clients: str, source: str, timeout: float = 0.7) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", clients, sys.executable, "-c", PROBE, source, str(timeout),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return out.decode().strip()


async def nft_list(edge: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", edge, "nft", "list", "table", "inet", "edgeward",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return out.decode()


@pytest.mark.netns
async def test_banned_source_is_dropped_by_the_kernel(
    namespaces: tuple[str, str], tmp_path: Path
) -> None:
    edge, clients = namespaces
    server = subprocess.Popen(
        ["ip", "netns", "exec", edge, sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        nft = NftSettings(enabled=True, command=["ip", "netns", "exec", edge, "nft"])
        jails = {
            "edge": JailSettings(sources=["edge:test"], maxretry=1, bantime=-1),
            "short": JailSettings(sources=["edge:short"], maxretry=1, bantime=2),
        }
        settings = GuardSettings(nft=nft)
        db = str(tmp_path / "g.sqlite")

        guard = Guard(settings, jails, db_path=db)
        await guard.start()
        try:
            assert await probe(clients, BANNED) == "open"
            guard.events.report(BANNED, "test", "x")
            await guard.wait_idle()
            assert guard.nft is not None
            await guard.nft.flushed()
            assert BANNED in await nft_list(edge)
            assert await probe(clients, BANNED) == "dropped"
            assert await probe(clients, OTHER) == "open"
        finally:
            await guard.stop()

        # a restart re-applies the whole table from the store
        sh("ip", "netns", "exec", edge, "nft", "delete", "table", "inet", "edgeward")
        assert await probe(clients, BANNED) == "open"
        guard = Guard(settings, jails, db_path=db)
        await guard.start()
        try:
            assert await probe(clients, BANNED) == "dropped"
            assert await guard.unban(BANNED) == [BANNED]
            assert guard.nft is not None
            await guard.nft.flushed()
            assert await probe(clients, BANNED) == "open"
            # a timed ban ends in the kernel on its own
            guard.events.report(OTHER, "short", "x")
            await guard.wait_idle()
            await guard.nft.flushed()
            assert "timeout 2s" in await nft_list(edge)
            assert await probe(clients, OTHER) == "dropped"
            deadline = time.monotonic() + 5
            while await probe(clients, OTHER, 0.3) != "open":
                assert time.monotonic() < deadline, "timed ban did not end"
            assert guard.nft.errors == 0
        finally:
            await guard.stop()
    finally:
        os.kill(server.pid, signal.SIGKILL)  # `ip netns exec` execs python: this is the server
        server.wait(timeout=10)
