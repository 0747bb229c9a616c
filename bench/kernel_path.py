"""The kernel fast path (forward = "kernel") vs direct routing vs edgeward in user space.

    python bench/kernel_path.py [--seconds N]      (root: it makes network namespaces)

Three namespaces made for the run and removed after it: a client, the edge (routing, with
net.ipv4.ip_forward=1) and the home server (iperf3 -s), joined by veth pairs. Each way is
measured with iperf3 from the client, in the same run, interleaved:

* direct: the client sends to the home address; the edge only routes (no NAT, no process);
* kernel: the client sends to the edge's address; edgeward's nftables table (rendered by
  kernel_forward.py from a config with forward = "kernel", applied with nft) DNATs to home;
* userspace: `edgeward run` in the edge namespace forwards the same port (TCP and UDP by
  session) to home.

Per way: UDP 200-byte datagrams flat out (-b 0) and paced (50,000/s), datagrams received per
second of sending and loss (the iperf3 server's count), and TCP bulk (1 stream). The last
line printed is one JSON object; ratios are to direct (goal for kernel: >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench import netns  # noqa: E402
from bench.iperf import parse_iperf_json, parse_iperf_udp_json  # noqa: E402

CLIENT, EDGE_PUBLIC, EDGE_TUNNEL, HOME = "198.51.100.2", "198.51.100.1", "10.8.0.1", "10.8.0.2"
IPERF_PORT, KERNEL_PORT, USER_PORT = 5201, 6201, 7201
UDP_LEN = 200


class Topology(netns.Topology):
    """client — edge (routing) — home, for this benchmark."""

    def __init__(self) -> None:
        super().__init__()
        tag = f"ewb{os.getpid() % 100000}"
        self.client, self.edge, self.home = f"{tag}-c", f"{tag}-e", f"{tag}-h"

    def __enter__(self) -> Topology:
        try:
            for name in (self.client, self.edge, self.home):
                self.add(name)
            self.link(self.client, self.edge, [f"{CLIENT}/24"], [f"{EDGE_PUBLIC}/24"])
            self.link(self.edge, self.home, [f"{EDGE_TUNNEL}/24"], [f"{HOME}/24"])
            netns.sh("ip", "-n", self.client, "route", "add", "10.8.0.0/24", "via", EDGE_PUBLIC)  # `direct` only
            netns.sh("ip", "-n", self.home, "route", "add", "default", "via", EDGE_TUNNEL)
            netns.ns(self.edge, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        except BaseException:
            self.close()
            raise
        return self


def config(work: Path) -> str:
    return f"""
[edge]
admin = "unix:{work / 'admin.sock'}"
state_dir = "{work / 'state'}"

[services.fast]
listen = ["[::]:{KERNEL_PORT}", "udp/[::]:{KERNEL_PORT}"]
to = "{HOME}:{IPERF_PORT}"
forward = "kernel"

[services.user]
listen = ["[::]:{USER_PORT}", "udp/[::]:{USER_PORT}"]
to = "{HOME}:{IPERF_PORT}"
"""


def iperf(topo: Topology, host: str, port: int, mode: str, seconds: int) -> dict[str, float]:
    argv = ["iperf3", "-c", host, "-p", str(port), "-J", "-t", str(seconds)]
    if mode == "tcp":
        out = subprocess.run(["ip", "netns", "exec", topo.client, *argv], capture_output=True, text=True,
                             timeout=seconds + 30).stdout
        return {"tcp_gbit_per_s": parse_iperf_json(out).gbit_per_s}
    rate = "0" if mode == "udp_flat" else "80M"
    out = subprocess.run(["ip", "netns", "exec", topo.client, *argv, "-u", "-b", rate, "-l", str(UDP_LEN)],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    r = parse_iperf_udp_json(out)
    return {f"{mode}_pkt_per_s": r.packets_per_s, f"{mode}_loss_pct": r.lost_percent}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("iperf3") is None or shutil.which("nft") is None:
        print(json.dumps({"error": "needs root, iperf3 and nft"}))
        return 1
    from edgeward.config.loader import loads
    from edgeward.kernel_forward import render

    work = Path(tempfile.mkdtemp(prefix="edgeward-bench-kernel-"))
    results: dict[str, dict[str, float]] = {"direct": {}, "kernel": {}, "userspace": {}}
    with Topology() as topo:
        cfg_text = config(work)
        (work / "edge.toml").write_text(cfg_text)
        server = netns.run_in(topo.home, ["iperf3", "-s", "-B", HOME, "-p", str(IPERF_PORT)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        exe = ROOT / ".venv/bin/edgeward"
        edge = netns.run_in(topo.edge, [str(exe) if exe.exists() else "edgeward", "run", str(work / "edge.toml")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not (work / "admin.sock").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            # edgeward applied the table itself; the rendered text is shown for the record.
            table = render(loads(cfg_text, "edge.toml"))
            ways = {"direct": (HOME, IPERF_PORT), "kernel": (EDGE_PUBLIC, KERNEL_PORT),
                    "userspace": (EDGE_PUBLIC, USER_PORT)}
            for mode in ("tcp", "udp_flat", "udp_paced"):
                for way, (host, port) in ways.items():
                    results[way].update(iperf(topo, host, port, mode, args.seconds))
                    time.sleep(0.5)
        finally:
            edge.terminate()
            edge.wait(15)
            server.terminate()
            server.wait(5)
    shutil.rmtree(work, ignore_errors=True)
    ratios = {f"{way}_vs_direct.{metric}": round(value / results["direct"][metric], 3)
              for way in ("kernel", "userspace") for metric, value in results[way].items()
              if not metric.endswith("loss_pct") and results["direct"].get(metric)}
    for way, r in results.items():
        print(way, {k: round(v, 3) for k, v in r.items()})
    print("nft table:", table.count("dnat"), "rule(s)")
    print(json.dumps({"kernel_path": {**{f"{w}.{k}": v for w, r in results.items() for k, v in r.items()}, **ratios}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
