"""What looking costs: edgeward's short connections/s and UDP datagrams with the dashboard open and
`/metrics` scraped every second, against the same with nobody looking (goal: < 3% difference).

Starts `edgeward run` in front of bench/tools/tcpecho (short connections routed by SNI, as in the
conn_rate case) and an iperf3 server (TCP control and UDP datagrams on one port, as in the udp
case). Each round measures both modes, alternating which goes first:

- off: nobody reads the admin API;
- on:  one dashboard event stream open (`GET /events`: a view a second) and `GET /metrics` every
       second, from threads of this script.

Per mode: connections/s of `connrate` (50 concurrent connect/hello/echo/close loops) and the edge's
CPU seconds per 1k connections; iperf3 -u paced to 50,000 datagrams/s: datagrams/s received and
the edge's CPU seconds per 1M datagrams. CPU comes from /proc (utime+stime), much less noisy than
wall-clock rates on a shared machine. The difference reported is the median over rounds of each
round's own on/off difference (the two modes run back to back). Prints a table and, last, one JSON
line (bench's script case).

    python bench/observe_cost.py [--rounds 3] [--seconds 5] [--quick]

Everything runs on 127.0.0.1 high ports, bounded in time; every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import ctools
from bench.hello import client_hello
from bench.iperf import parse_iperf_udp_json
from bench.procs import ProcessGroup, cpu_seconds, wait_port

UDP_LEN = 200
UDP_RATE = "80M"  # 50,000 datagrams/s of 200 bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Observer:
    """The dashboard's event stream open, and /metrics scraped every second, until stopped."""

    def __init__(self, admin: int) -> None:
        self.admin = admin
        self.stop = threading.Event()
        self.views = 0
        self.scrapes = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._events, daemon=True),
                        threading.Thread(target=self._scrape, daemon=True)]

    def __enter__(self) -> Observer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)

    def _events(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.admin), timeout=5) as s:
                s.sendall(b"GET /events HTTP/1.1\r\nHost: bench\r\n\r\n")
                s.settimeout(0.5)
                buf = b""
                while not self.stop.is_set():
                    try:
                        chunk = s.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        self.errors.append("event stream closed")
                        return
                    # Count "data: " lines, also when one is split between two reads.
                    self.views += (buf + chunk).count(b"data: ") - buf.count(b"data: ")
                    buf = (buf + chunk)[-5:]
        except OSError as e:
            self.errors.append(f"events: {e}")

    def _scrape(self) -> None:
        while not self.stop.wait(1.0):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=5)
                conn.request("GET", "/metrics")
                body = conn.getresponse().read()
                conn.close()
                if b"edgeward_service_clients" in body:
                    self.scrapes += 1
            except OSError as e:
                self.errors.append(f"metrics: {e}")


def run_connrate(tools: dict[str, Path], port: int, hello: Path, seconds: int) -> dict[str, Any]:
    if "connrate" in tools:
        argv = [str(tools["connrate"]), "127.0.0.1", str(port), "50", str(seconds), "10000000", str(hello)]
    else:
        argv = [sys.executable, "-m", "bench.connrate", "--port", str(port), "--concurrency", "50",
                "--duration", str(seconds)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                         cwd=str(Path(__file__).resolve().parents[1]))
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_udp(port: int, seconds: int) -> Any:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-u", "-b", UDP_RATE, "-l", str(UDP_LEN),
            "-t", str(seconds), "-J"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    return parse_iperf_udp_json(out.stdout)


def measure(pid: int, tools: dict[str, Path], ports: dict[str, int], hello: Path, seconds: int) -> dict[str, float]:
    cpu0 = cpu_seconds([pid])
    r = run_connrate(tools, ports["rate"], hello, seconds)
    cpu = cpu_seconds([pid]) - cpu0
    out = {"conn_per_s": float(r["conn_per_s"]), "cpu_s_per_1k_conn": cpu / max(1e-9, r["connections"] / 1000),
           "conn_failed": float(r["failed"])}
    time.sleep(0.5)
    cpu0 = cpu_seconds([pid])
    u = run_udp(ports["udp"], seconds)
    cpu = cpu_seconds([pid]) - cpu0
    out["udp_pps"] = float(u.packets_per_s)
    out["cpu_s_per_1m_dgram"] = cpu / max(1e-9, u.received_packets / 1e6)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s per mode")
    args = ap.parse_args(argv)
    rounds, seconds = (1, 2) if args.quick else (args.rounds, args.seconds)
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    observer_ms_per_s = 0.0
    observed: dict[str, int] = {"views": 0, "scrapes": 0}
    with tempfile.TemporaryDirectory(prefix="edgeward-observe-") as tmp_s:
        tmp = Path(tmp_s)
        group = ProcessGroup(tmp)
        try:
            tools, why = ctools.build(tmp / "tools")
            if why:
                print(f"note: {why}", file=sys.stderr)
            ports = {k: free_port() for k in ("echo", "iperf", "rate", "udp", "admin")}
            hello = tmp / "hello.bin"
            hello.write_bytes(client_hello("bench.example.org")[0])
            echo_argv = ([str(tools["tcpecho"]), str(ports["echo"])] if "tcpecho" in tools
                         else [sys.executable, "-m", "bench.echo", "--port", str(ports["echo"])])
            echo = group.start("echo", echo_argv)
            wait_port(ports["echo"], proc=echo)
            iperf = group.start("iperf3", ["iperf3", "-s", "-p", str(ports["iperf"])])
            wait_port(ports["iperf"], proc=iperf)
            cfg = tmp / "edge.toml"
            cfg.write_text(f"""
[edge]
admin = "127.0.0.1:{ports['admin']}"
state_dir = "{tmp / 'state'}"
log_level = "warning"

[services.rate]
listen = ["127.0.0.1:{ports['rate']}"]
names = ["bench.example.org"]
to = "127.0.0.1:{ports['echo']}"

[services.udp]
listen = ["127.0.0.1:{ports['udp']}", "udp/127.0.0.1:{ports['udp']}"]
to = "127.0.0.1:{ports['iperf']}"
""")
            edge = group.start("edgeward", [sys.executable, "-m", "edgeward.cli", "run", str(cfg)])
            wait_port(ports["admin"], proc=edge)
            wait_port(ports["rate"], proc=edge)
            measure(edge.pid, tools, ports, hello, 1)  # warm-up, not counted
            # What looking costs by itself: the idle edge's CPU with and without the observer.
            idle = 5 if args.quick else 10
            time.sleep(1.0)
            cpu0 = cpu_seconds([edge.pid])
            time.sleep(idle)
            alone = cpu_seconds([edge.pid]) - cpu0
            with Observer(ports["admin"]):
                time.sleep(1.5)
                cpu0 = cpu_seconds([edge.pid])
                time.sleep(idle)
                watched = cpu_seconds([edge.pid]) - cpu0
            observer_ms_per_s = max(0.0, watched - alone) * 1000 / idle
            for rnd in range(rounds):
                for mode in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
                    time.sleep(1.0)
                    if mode == "on":
                        with Observer(ports["admin"]) as obs:
                            time.sleep(1.5)  # the dashboard is open before the load starts
                            m = measure(edge.pid, tools, ports, hello, seconds)
                        if obs.errors or not obs.views or not obs.scrapes:
                            raise RuntimeError(f"the observer did not observe: {obs.errors}, "
                                               f"{obs.views} views, {obs.scrapes} scrapes")
                        observed["views"] += obs.views
                        observed["scrapes"] += obs.scrapes
                    else:
                        m = measure(edge.pid, tools, ports, hello, seconds)
                    runs[mode].append(m)
                    print(f"round {rnd + 1} {mode:3}: " + "  ".join(f"{k} {v:,.4g}" for k, v in m.items()),
                          file=sys.stderr)
        finally:
            group.stop_all()
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    # The difference is the median of each round's own difference (both modes run back to back in
    # a round): drift and another program's burst hit a pair, not one mode's median.
    diff = {k: round(statistics.median(100.0 * (on[k] - off[k]) / off[k] for on, off in zip(runs["on"], runs["off"],
                                                                                           strict=True)), 2)
            for k in ("conn_per_s", "cpu_s_per_1k_conn", "udp_pps", "cpu_s_per_1m_dgram")
            if all(r[k] for r in runs["off"])}
    print(f"{'metric':22} {'nobody looking':>16} {'dashboard+scrape':>18} {'difference (median of rounds)':>31}")
    for k in diff:
        print(f"{k:22} {med['off'][k]:16.4g} {med['on'][k]:18.4g} {diff[k]:+30.2f}%")
    # The observer's own cost as a share of the edge's CPU under each load (CPU seconds per second).
    off = med["off"]
    estimate = {
        "conn": round(100 * observer_ms_per_s / 1000 / (off["cpu_s_per_1k_conn"] * off["conn_per_s"] / 1000), 2),
        "udp": round(100 * observer_ms_per_s / 1000 / (off["cpu_s_per_1m_dgram"] * off["udp_pps"] / 1e6), 2),
    }
    print(f"looking costs the idle edge {observer_ms_per_s:.1f} ms of CPU per second: "
          f"{estimate['conn']:.2f}% of its CPU under the connection load, {estimate['udp']:.2f}% under the UDP load")
    cpu = [abs(diff[k]) for k in ("cpu_s_per_1k_conn", "cpu_s_per_1m_dgram") if k in diff]
    print(f"goal (issue 10): the edge's CPU per connection and per datagram within 3% when looked at: "
          f"{'PASS' if cpu and max(cpu) < 3 else 'FAIL'} ({', '.join(f'{c:.2f}%' for c in cpu)})")
    print(json.dumps({"off": med["off"], "on": med["on"], "difference_pct": diff, "rounds": rounds,
                      "observer_cpu_ms_per_s": round(observer_ms_per_s, 2), "observer_share_pct": estimate,
                      "seconds": seconds, **observed}))


if __name__ == "__main__":
    main()
