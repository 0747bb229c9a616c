"""Shared ban latency: from a ban on edge node A to node B refusing that address ([guard.share]).

Starts Debian's redis-server (own directory, loopback high port, no persistence) and two
`edgeward run` nodes sharing bans through it, each relaying a port to an echo server. Then
for N distinct loopback addresses: the clock starts, the address is banned on A through A's
admin API (POST /ban, which returns once A has stored and enforced it), and B is probed
from that address (connect, send, echo) until B refuses it. The time includes A's admin
request; it is an upper bound of what propagation through Redis costs. Prints p50/p90/p99/max
in milliseconds, and a JSON line at the end. Goal (issue 12): p99 <= 100 ms.

    python bench/shared_ban_latency.py [--rounds 200]

Everything runs on 127.0.0.0/8 high ports, is bounded in count and time, and every process
started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.ban_latency import echo_server, free_port, served, wait_port


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT if "edgeward" in " ".join(map(str, proc.args)) else signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def admin_post(port: int, path: str, body: object) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status}")


def connected(admin: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/guard", timeout=5) as r:
            return bool(json.loads(r.read())["share"]["connected"])
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200, help="addresses banned (default 200)")
    args = ap.parse_args()
    redis_exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    tmp = Path(tempfile.mkdtemp(prefix="edgeward-sharedban-"))
    srv, up = echo_server()
    rport = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    latencies: list[float] = []
    posts: list[float] = []  # of which A's admin request (ban stored and enforced on A)
    missed = 0
    try:
        procs.append(subprocess.Popen(
            [redis_exe, "--bind", "127.0.0.1", "--port", str(rport), "--dir", str(tmp), "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--logfile", str(tmp / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(rport)
        nodes: dict[str, tuple[int, int]] = {}
        for name in ("a", "b"):
            port, admin = free_port(), free_port()
            cfg = tmp / f"{name}.toml"
            cfg.write_text(f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp}/{name}-state"
[services.echo]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up}"
[guard.share]
redis = "redis://127.0.0.1:{rport}/0"
node = "{name}"
""")
            procs.append(subprocess.Popen([sys.executable, "-m", "edgeward.cli", "run", str(cfg)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            nodes[name] = (port, admin)
        for port, admin in nodes.values():
            wait_port(port)
            wait_port(admin)
            deadline = time.monotonic() + 15
            while not connected(admin) and time.monotonic() < deadline:
                time.sleep(0.05)
        (_, a_admin), (b_port, _) = nodes["a"], nodes["b"]
        for i in range(args.rounds):
            ip = f"127.0.{20 + i // 250}.{1 + i % 250}"
            t0 = time.perf_counter()
            admin_post(a_admin, "/ban", {"addr": ip, "reason": "bench"})
            posts.append((time.perf_counter() - t0) * 1000)
            deadline = t0 + 2.0
            while time.perf_counter() < deadline:
                if not served(ip, b_port):
                    latencies.append((time.perf_counter() - t0) * 1000)
                    break
            else:
                missed += 1
    finally:
        for p in reversed(procs):
            stop(p)
        srv.close()
        shutil.rmtree(tmp, ignore_errors=True)
    latencies.sort()

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))], 2) if latencies else None

    result = {
        "case": "shared_ban_latency",
        "rounds": args.rounds,
        "missed": missed,
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "ban_on_a_p50_ms": round(statistics.median(posts), 2) if posts else None,
        "goal_p99_ms": 100,
    }
    print(f"shared ban latency (ban on A -> refused on B) over {len(latencies)} bans: p50 {result['p50_ms']} ms, "
          f"p90 {result['p90_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms, missed {missed} "
          f"(of which the ban on A itself, its admin request: p50 {result['ban_on_a_p50_ms']} ms)")
    print(json.dumps(result))


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    main()
