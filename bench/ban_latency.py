"""Ban latency: from a failing line appended to a log to the edge refusing that address.

Starts `edgeward run` with a jail following a temp log and an echo upstream, then
for N distinct loopback addresses: appends `maxretry` failing lines naming the
address and probes through the edge from that address until a connection is
refused. Prints p50/p90/p99/max in milliseconds and a JSON line at the end.

    python bench/ban_latency.py [--rounds 200]

Everything runs on 127.0.0.0/8 high ports, is bounded in count and time, and
every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LINE = "{date} c2s55d5f4ebd6c0\tinfo\tFailed authentication attempt (not-authorized) for user mallory@example.org from IP: {ip}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"port {port} did not open")


def echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(512)

    def serve(c: socket.socket) -> None:
        with c:
            try:
                while d := c.recv(4096):
                    c.sendall(d)
            except OSError:
                pass

    def loop() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv, int(srv.getsockname()[1])


def served(src: str, port: int) -> bool:
    try:
        with socket.socket() as c:
            c.bind((src, 0))
            c.settimeout(1)
            c.connect(("127.0.0.1", port))
            c.sendall(b"x")
            return c.recv(1) == b"x"
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=200, help="addresses banned (default 200)")
    ap.add_argument("--maxretry", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgeward-banlat-"))
    log = tmp / "prosody.log"
    log.write_text("")
    srv, up = echo_server()
    port, admin = free_port(), free_port()
    cfg = tmp / "edge.toml"
    cfg.write_text(f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp}/state"
[services.xmpp]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up}"
[jails.prosody]
logpath = ["{log}"]
filter = "prosody-auth"
maxretry = {args.maxretry}
findtime = "5m"
bantime = -1
""")
    edge = subprocess.Popen(
        [sys.executable, "-m", "edgeward.cli", "run", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latencies: list[float] = []
    missed = 0
    try:
        wait_port(port)
        wait_port(admin)
        for i in range(args.rounds):
            ip = f"127.0.{10 + i // 250}.{1 + i % 250}"
            date = time.strftime("%b %d %H:%M:%S")
            with log.open("a") as f:
                f.write(LINE.format(date=date, ip=ip) * (args.maxretry - 1))
                f.flush()
                time.sleep(0.005)  # the last line alone is the one that bans
                f.write(LINE.format(date=date, ip=ip))
                f.flush()
                os.fsync(f.fileno())
            t0 = time.perf_counter()
            deadline = t0 + 2.0
            while time.perf_counter() < deadline:
                if not served(ip, port):
                    latencies.append((time.perf_counter() - t0) * 1000)
                    break
            else:
                missed += 1
    finally:
        edge.send_signal(signal.SIGINT)
        try:
            edge.wait(10)
        except subprocess.TimeoutExpired:
            edge.kill()
            edge.wait(5)
        srv.close()
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]
            if latencies
            else float("nan")
        )

    result = {
        "case": "ban_latency",
        "rounds": args.rounds,
        "missed": missed,
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p90_ms": round(pct(90), 2),
        "p99_ms": round(pct(99), 2),
        "max_ms": round(latencies[-1], 2) if latencies else None,
    }
    print(
        f"ban latency over {len(latencies)} bans: p50 {result['p50_ms']} ms, p90 {result['p90_ms']} ms, "
        f"p99 {result['p99_ms']} ms, max {result['max_ms']} ms, missed {missed}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
