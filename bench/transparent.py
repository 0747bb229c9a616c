"""Transparent mode (issue 9): relaying from the client's own address (IP_TRANSPARENT) vs the plain
relay, bulk and short connections, in network namespaces this script creates.

    python bench/transparent.py [--quick] [--rounds 3]      (root: it creates network namespaces)

client 10.82.1.2 ── 10.82.1.1 edge 10.82.2.1 ── 10.82.2.2 upstream (iperf3 server, bench/tools/tcpecho.c),
the upstream routing client addresses via the edge, the edge's return path from `edgeward nft`.
One edgeward serves two ports to the same upstream: one transparent, one plain. iperf3 (1 stream,
`-t 5`, `-t 2` quick) and connrate (50 concurrent connect + TLS hello + echo + close, 5 s / 2 s)
from the client namespace to each, alternating; the edge's own CPU (utime+stime) per GB and per 1k
connections, the steadier comparison on a shared machine. Prints a table and one JSON line at the end.
Every namespace and process it made is removed or stopped, also on errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import ctools  # noqa: E402
from bench.hello import client_hello  # noqa: E402
from bench.netns import Topology, ns, running  # noqa: E402
from bench.procs import cpu_seconds, wait_for  # noqa: E402

TAG = str(os.getpid() % 100000)
CLIENT, EDGE, UP = f"ewb-c{TAG}", f"ewb-e{TAG}", f"ewb-u{TAG}"
C4, E4C, E4U, U4 = "10.82.1.2", "10.82.1.1", "10.82.2.1", "10.82.2.2"
IPERF, ECHO, PLAIN_BULK, TRANS_BULK, PLAIN_RATE, TRANS_RATE = 5201, 7000, 8001, 8002, 8003, 8004
SNI = "bench.example.org"


@contextlib.contextmanager
def namespaces() -> Iterator[None]:
    with Topology() as topo:
        for n in (CLIENT, EDGE, UP):
            topo.add(n)
        topo.link(CLIENT, EDGE, [f"{C4}/24"], [f"{E4C}/24"])
        topo.link(EDGE, UP, [f"{E4U}/24"], [f"{U4}/24"])
        ns(UP, "ip", "route", "add", "default", "via", E4U)
        # Tens of thousands of short connections per run from one client address: reuse TIME_WAIT
        # ports (namespaces start with reuse for loopback only) and widen the ephemeral range.
        for n in (CLIENT, EDGE):
            ns(n, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")
            ns(n, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000")
        yield


def listening(name: str, port: int) -> bool:
    return bool(ns(name, "ss", "-Hltn", f"sport = :{port}", check=False).stdout.strip())


CONFIG = f"""
[pools.plain-bulk]
servers = ["{U4}:{IPERF}"]
[pools.trans-bulk]
servers = ["{U4}:{IPERF}"]
transparent = true
[pools.plain-rate]
servers = ["{U4}:{ECHO}"]
[pools.trans-rate]
servers = ["{U4}:{ECHO}"]
transparent = true
[services.plain-bulk]
listen = ["{E4C}:{PLAIN_BULK}"]
to = "plain-bulk"
[services.trans-bulk]
listen = ["{E4C}:{TRANS_BULK}"]
to = "trans-bulk"
[services.plain-rate]
listen = ["{E4C}:{PLAIN_RATE}"]
names = ["{SNI}"]
to = "plain-rate"
[services.trans-rate]
listen = ["{E4C}:{TRANS_RATE}"]
names = ["{SNI}"]
to = "trans-rate"
"""


def run(work: Path, tools: dict[str, Path], rounds: int, seconds: int) -> list[dict[str, float]]:
    cfg = work / "edge.toml"
    cfg.write_text(f'[edge]\nadmin = "unix:{work}/admin.sock"\nstate_dir = "{work}/state"\nlog_level = "warning"\n'
                   + CONFIG)
    hello = work / "hello.bin"
    hello.write_bytes(client_hello(SNI)[0])
    script = subprocess.run([sys.executable, "-m", "edgeward.cli", "nft", str(cfg)], capture_output=True, text=True,
                            check=True, timeout=60).stdout
    runs = []
    with running(UP, ["iperf3", "-s", "-B", U4, "-p", str(IPERF)], work / "iperf.log"), \
            running(UP, [str(tools["tcpecho"]), str(ECHO), U4], work / "echo.log"), \
            running(EDGE, [sys.executable, "-m", "edgeward.cli", "run", str(cfg)], work / "edge.log") as edge:
        wait_for(lambda: listening(UP, IPERF) and listening(UP, ECHO) and listening(EDGE, TRANS_RATE))
        ns(EDGE, "sh", "-c", script)
        for _ in range(rounds):
            one: dict[str, float] = {}
            for kind, bulk, rate in (("plain", PLAIN_BULK, PLAIN_RATE), ("transparent", TRANS_BULK, TRANS_RATE)):
                cpu0 = cpu_seconds([edge.pid])
                out = ns(CLIENT, "iperf3", "-c", E4C, "-p", str(bulk), "-t", str(seconds), "-J", timeout=seconds + 30)
                received = json.loads(out.stdout)["end"]["sum_received"]
                one[f"{kind}_gbps"] = received["bits_per_second"] / 1e9
                one[f"{kind}_cpu_s_per_gb"] = (cpu_seconds([edge.pid]) - cpu0) / (received["bytes"] / 1e9)
                cpu0 = cpu_seconds([edge.pid])
                out = ns(CLIENT, str(tools["connrate"]), E4C, str(rate), "50", str(seconds), "10000000", str(hello),
                         timeout=seconds + 30)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                one[f"{kind}_cpu_s_per_1k"] = (cpu_seconds([edge.pid]) - cpu0) / (max(1, r["connections"]) / 1000)
                if r["failed"] > 0.01 * max(1, r["connections"]):
                    raise RuntimeError(f"{kind}: {r['failed']} failed connections: {r['errors']}")
                one[f"{kind}_conn_per_s"] = float(r["conn_per_s"])
            one["bulk_ratio"] = one["transparent_gbps"] / one["plain_gbps"]
            one["conn_ratio"] = one["transparent_conn_per_s"] / one["plain_conn_per_s"]
            one["cpu_per_gb_ratio"] = one["transparent_cpu_s_per_gb"] / one["plain_cpu_s_per_gb"]
            one["cpu_per_conn_ratio"] = one["transparent_cpu_s_per_1k"] / one["plain_cpu_s_per_1k"]
            print(", ".join(f"{k} {v:.3g}" for k, v in one.items()), flush=True)
            runs.append(one)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, short runs")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/transparent.py creates network namespaces: run it as root")
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-transparent-") as tmp:
        work = Path(tmp)
        tools, why = ctools.build(work / "tools")
        if why:
            sys.exit(why)
        with namespaces():
            runs = run(work, tools, 1 if args.quick else args.rounds, 2 if args.quick else 5)
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\nmedians of {len(runs)} round(s):")
    for k, v in summary.items():
        print(f"  {k:24} {v:,.3f}")
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
