"""Who is on now: distinct clients per service, pool and server in `status`, `/clients`, `/metrics`
and `edgeward status` / `edgeward clients`, kept from the open/close events.

The issue's own case: service web with 2 connections from one address and 1 from another, service
chat with 1 from a third: web has 2 clients, chat 1, the edge 3; they drop back as they close.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

from support import (
    EDGEWARD,
    EdgeProcess,
    ThreadServer,
    UdpEcho,
    connect_from,
    echo_handler,
    free_port,
    metric,
    wait_until,
)

LONG = "a-service-with-a-name-far-longer-than-eighty-columns-would-ever-let-a-table-show-in-full"


def echo_once(c: socket.socket, data: bytes) -> None:
    c.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = c.recv(65536)
        assert chunk
        got += chunk


def test_distinct_clients_per_service_and_server(tmp_path: Path) -> None:
    web_a, web_b, chat_up = ThreadServer(echo_handler()), ThreadServer(echo_handler()), ThreadServer(echo_handler())
    media_up = UdpEcho()
    web, chat, media, admin = free_port(), free_port(), free_port(), free_port()
    e = EdgeProcess(tmp_path, f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"
[listeners.web]
bind = ["127.0.0.1:{web}"]
[listeners.chat]
bind = ["127.0.0.1:{chat}"]
[listeners.media]
bind = ["udp/127.0.0.1:{media}"]
[pools.webpool]
servers = ["127.0.0.1:{web_a.port}", "127.0.0.1:{web_b.port}"]
balance = "source-hash"
[services.web]
listen = ["web"]
to = "webpool"
[services.{LONG}]
listen = ["chat"]
to = "127.0.0.1:{chat_up.port}"
[services.media]
listen = ["media"]
to = "127.0.0.1:{media_up.port}"
""", admin_port=admin, wait=[("127.0.0.1", web), ("127.0.0.1", chat)])
    conns: list[socket.socket] = []
    try:
        conns += [connect_from("127.0.0.21", web), connect_from("127.0.0.21", web), connect_from("127.0.0.22", web),
                  connect_from("127.0.0.23", chat)]
        for c in conns:
            echo_once(c, b"x" * 1000)
        # The same address over UDP: a third service, and still one client of the edge.
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.21", 0))
        u.settimeout(3)
        u.sendto(b"ping", ("127.0.0.1", media))
        assert u.recv(100) == b"ping"

        def svc() -> dict[str, Any]:
            return e.status()["services"]  # type: ignore[return-value]
        assert wait_until(lambda: svc()["web"]["active"] == 3 and svc()[LONG]["active"] == 1)
        st = e.status()
        services: dict[str, Any] = st["services"]  # type: ignore[assignment]
        assert st["connections"] == 4 and st["udp_sessions"] == 1 and st["clients"] == 3
        assert services["web"]["clients"] == 2  # two connections from .21 are one client
        assert services[LONG]["clients"] == 1 and services["media"]["clients"] == 1
        assert services["web"]["bytes_in"] == 3000 and services["web"]["bytes_out"] == 3000  # live, not yet ended
        pool: dict[str, Any] = st["pools"]["webpool"]  # type: ignore[index]
        assert pool["clients"] == 2 and pool["active"] == 3
        per_server = {s["server"]: s for s in pool["servers"]}
        assert sum(s["clients"] for s in per_server.values()) == 2  # source hash: each address on one server
        assert sum(s["active"] for s in per_server.values()) == 3
        for s in per_server.values():
            assert s["bytes_in"] == 1000 * s["active"]
        per_server_names = set(per_server)

        # Throughput: sampled every second while someone looks (these status reads): the 3000 bytes
        # show as a rate, which falls back to 0 once nothing moves.
        assert wait_until(lambda: svc()["web"]["in_rate"] > 0, 5)
        assert wait_until(lambda: svc()["web"]["in_rate"] == 0 and e.status()["in_rate"] == 0, 5)
        for c in conns[:3]:
            echo_once(c, b"y" * 50_000)
        assert wait_until(lambda: e.status()["pools"]["webpool"]["servers"][0]["in_rate"]  # type: ignore[index]
                          + e.status()["pools"]["webpool"]["servers"][1]["in_rate"] > 0, 5)  # type: ignore[index]
        st = e.status()
        services = st["services"]  # type: ignore[assignment]
        assert services["web"]["bytes_in"] == 153_000

        # The live list, filtered by service and by address, with a limit.
        code, data = e.api("GET", "/clients?service=web")
        assert code == 200 and isinstance(data, dict)
        assert data["matched"] == 3 and data["distinct"] == 2 and data["addresses"] == {"127.0.0.21": 2, "127.0.0.22": 1}
        row = data["clients"][0]
        assert row["service"] == "web" and row["transport"] == "tcp" and row["bytes_in"] == 51_000
        assert row["upstream"] in per_server_names and row["since"] > 0
        code, data = e.api("GET", "/clients?address=127.0.0.21&limit=1")
        assert code == 200 and isinstance(data, dict)
        assert data["matched"] == 3 and len(data["clients"]) == 1  # 2 TCP + 1 UDP; one shown
        assert {c["address"] for c in data["clients"]} == {"127.0.0.21"}
        code, data = e.api("GET", "/clients?limit=x")
        assert code == 400

        # /metrics: the same numbers, labelled by service/pool/server only.
        code, text = e.api("GET", "/metrics")
        assert code == 200 and isinstance(text, str)
        assert metric(text, "edgeward_clients") == 3
        assert metric(text, "edgeward_service_clients", service="web") == 2
        assert metric(text, "edgeward_service_open_connections", service="web") == 3
        assert metric(text, "edgeward_service_received_bytes_total", service="web") == 153_000
        assert metric(text, "edgeward_pool_clients", pool="webpool") == 2
        for name, s in per_server.items():
            assert metric(text, "edgeward_server_clients", pool="webpool", server=name) == s["clients"]
        assert metric(text, "edgeward_listener_open_connections", address=f"127.0.0.1:{web}", listener="web",
                      transport="tcp") == 3  # labels in the order prometheus_client writes them
        assert metric(text, "edgeward_listener_open_connections", address=f"127.0.0.1:{media}", listener="media",
                      transport="udp") == 1
        assert "127.0.0.2" not in text  # never a client address as a label

        # `edgeward status` piped (not a terminal): full width, nothing cut; --json has the same numbers.
        out = subprocess.run([*EDGEWARD, "status", "--admin", f"127.0.0.1:{admin}"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        assert LONG in out and "…" not in out
        line = next(x for x in out.splitlines() if x.lstrip("│ ").startswith("web "))
        assert line.split("│")[4].strip() == "2"  # the clients column
        out = subprocess.run([*EDGEWARD, "status", "--json", "--admin", f"127.0.0.1:{admin}"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        assert json.loads(out)["services"]["web"]["clients"] == 2
        out = subprocess.run([*EDGEWARD, "clients", "-s", "web", "--admin", f"127.0.0.1:{admin}"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        assert "2 distinct address(es), 3 connection(s)" in out and "127.0.0.22" in out

        # They drop back as they close: one of .21's two connections leaves, .21 is still on.
        conns.pop(0).close()
        assert wait_until(lambda: svc()["web"]["active"] == 2)
        assert svc()["web"]["clients"] == 2
        conns.pop(0).close()
        assert wait_until(lambda: svc()["web"]["clients"] == 1)
        assert e.status()["clients"] == 3  # .21 still has its UDP session
        u.close()
        for c in conns:
            c.close()
        conns.clear()
        assert wait_until(lambda: svc()["web"]["clients"] == 0 and svc()[LONG]["clients"] == 0)
        st = e.status()
        assert st["pools"]["webpool"]["clients"] == 0  # type: ignore[index]
        assert st["services"]["web"]["bytes_in"] == 153_000  # type: ignore[index]  # ended, still counted
    finally:
        for c in conns:
            c.close()
        e.stop()
        for s in (web_a, web_b, chat_up):
            s.close()
        media_up.close()
