"""wrk keep-alive through the HTTP layer alone (tests/http_harness.py: edgeward.http.HttpProxy on
uvloop) against nginx, beside nginx direct and HAProxy `mode http` in front of the same nginx.

    .venv/bin/python -m bench.http_layer [--rounds 3] [--duration 5] [--connections 32]

Interleaved rounds (direct, haproxy, edgeward-http, ...); prints each run and the medians as JSON,
with requests/s, latency p50/p99 (wrk's), each proxy's CPU seconds per 10k requests, and its RSS
per idle keep-alive client connection (after one request each). Measured, never asserted. The edge here is the HTTP layer in its own process, without the rest of the edge.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.procs import ProcessGroup, cpu_seconds, wait_port

ROOT = Path(__file__).resolve().parent.parent
BODY = "x" * 64  # a small response, like a health or API endpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wrk(port: int, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 30,
                         check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def ms(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
        if m is None:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": ms("50%"), "p99_ms": ms("99%"), "non_2xx": float(errors.group(1)) if errors else 0.0}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def idle_memory(port: int, pid: int, n: int) -> float:
    """KiB of the proxy's RSS per idle keep-alive client connection (each made one request)."""
    before = rss_kib(pid)
    conns = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            conns.append(s)
        for s in conns:
            s.settimeout(10)
            got = b""
            while BODY.encode() not in got:
                d = s.recv(4096)
                if not d:
                    raise RuntimeError(f"the proxy closed an idle-memory connection after {got[:200]!r}")
                got += d
        return (rss_kib(pid) - before) / n
    finally:
        for s in conns:
            s.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--idle", type=int, default=2000, help="idle keep-alive client connections for the memory figure")
    args = ap.parse_args()
    for tool in ("wrk", "nginx", "haproxy"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is missing (make peers)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="edgeward-bench-http-"))
    ngx_port, hap_port, edge_port = free_port(), free_port(), free_port()
    (work / "logs").mkdir()
    (work / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/logs/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{ listen 127.0.0.1:{ngx_port}; location / {{ return 200 "{BODY}"; }} }}
}}
""")
    (work / "haproxy.cfg").write_text(f"""
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend f
    bind 127.0.0.1:{hap_port}
    default_backend b
backend b
    http-reuse always
    server n 127.0.0.1:{ngx_port}
""")
    (work / "edge.toml").write_text(f"""
[http]
redirect = "off"
[services.bench]
listen = ["127.0.0.1:{edge_port}"]
to = "http://127.0.0.1:{ngx_port}"
""")
    runs: dict[str, list[dict[str, float]]] = {"direct": [], "haproxy": [], "edgeward-http": []}
    try:
        with ProcessGroup(work) as group:
            ngx = group.start("nginx", ["nginx", "-p", str(work), "-c", str(work / "nginx.conf")])
            hap = group.start("haproxy", ["haproxy", "-db", "-f", str(work / "haproxy.cfg")])
            edge = group.start("edgeward-http", [sys.executable, str(ROOT / "tests" / "http_harness.py"),
                                                 str(work / "edge.toml")])
            for port, proc in ((ngx_port, ngx), (hap_port, hap), (edge_port, edge)):
                wait_port(port, proc=proc)
            ports = {"direct": ngx_port, "haproxy": hap_port, "edgeward-http": edge_port}
            pids = {"direct": [], "haproxy": [hap.pid], "edgeward-http": [edge.pid]}
            for port in ports.values():  # warm-up (keep-alive pools, caches)
                wrk(port, 1, args.connections)
            for rnd in range(args.rounds):
                for name, port in ports.items():
                    cpu0 = cpu_seconds(pids[name])
                    r = wrk(port, args.duration, args.connections)
                    cpu = cpu_seconds(pids[name]) - cpu0
                    r["cpu_s_per_10k"] = cpu / (r["rps"] * args.duration) * 10_000 if pids[name] else 0.0
                    runs[name].append(r)
                    print(json.dumps({"round": rnd, "contestant": name, **r}), flush=True)
            idle = {name: idle_memory(ports[name], pids[name][0], args.idle) for name in ("haproxy", "edgeward-http")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    med["ratios"] = {
        "edgeward_http_vs_direct_rps": med["edgeward-http"]["rps"] / med["direct"]["rps"],
        "edgeward_http_vs_haproxy_rps": med["edgeward-http"]["rps"] / med["haproxy"]["rps"],
        "edgeward_http_vs_haproxy_p99": med["edgeward-http"]["p99_ms"] / med["haproxy"]["p99_ms"],
    }
    print(json.dumps({"median": med, "idle_kib_per_connection": idle, "rounds": args.rounds,
                      "duration_s": args.duration, "connections": args.connections}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
