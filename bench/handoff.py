"""Socket handoff (issue 9): throughput after a handoff vs a direct connection, and handoffs per
second vs connections HAProxy (and edgeward) relay per second, on one run.

    python bench/handoff.py [--quick] [--rounds 3]

Throughput: iperf3 (`-t 5`, `-t 2` quick, one stream) straight to an iperf3 server ("direct"),
and through edgeward handing the connections to an identical iperf3 server that takes them
through the LD_PRELOAD shim (shim/handoff_preload.c): after the handoff the bytes go from the
client's socket to iperf3's with no proxy between ("handoff"); edgeward relaying to a plain
iperf3 server ("relay") for reference.

Rate: bench/tools/connrate.c, 50 concurrent loops of connect, TLS ClientHello with SNI
`bench.example.org`, read its echo, close (5 s, 2 s quick), against bench/tools/tcpecho.c:
behind the shim and edgeward's handoff ("handoff"), behind HAProxy routing by SNI ("haproxy",
one thread, as in the main bench), behind edgeward relaying ("relay"). CPU is each proxy's own
(utime+stime), per 1k connections. Prints a table and one JSON line at the end.

Everything runs on 127.0.0.1 high ports; every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
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
from bench.procs import cpu_seconds, stop_process, wait_for  # noqa: E402

SHIM = ROOT / "build" / "shim" / "libedgeward_handoff.so"
SNI = "bench.example.org"


def haproxy_config(port: int, echo: int, nbthread: int = 1) -> str:
    """HAProxy forwarding connections whose ClientHello names SNI to the echo server on `echo`
    (the SNI routing every contestant of the short-connection cases does)."""
    return f"""global
    nbthread {nbthread}
    maxconn 9600
defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m
frontend rate
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend echo if {{ req.ssl_sni -i {SNI} }}
backend echo
    server echo 127.0.0.1:{echo}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def started(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield p
    finally:
        stop_process(p, grace=10)


def shim_env(port: int, sock: Path) -> dict[str, str]:
    return dict(os.environ, LD_PRELOAD=str(SHIM), EDGEWARD_HANDOFF=f"127.0.0.1:{port}={sock}")


def edge_config(work: Path, name: str, body: str) -> Path:
    cfg = work / f"{name}.toml"
    cfg.write_text(f'[edge]\nadmin = "unix:{work}/{name}-admin.sock"\nstate_dir = "{work}/{name}-state"\n'
                   f'log_level = "warning"\n{body}')
    return cfg


def edge(work: Path, name: str, body: str, port: int) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return started([sys.executable, "-m", "edgeward.cli", "run", str(edge_config(work, name, body))],
                   work / f"{name}.log")


def iperf_gbps(port: int, seconds: int) -> float:
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                         capture_output=True, text=True, timeout=seconds + 30, check=True)
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def throughput(work: Path, seconds: int) -> dict[str, float]:
    out: dict[str, float] = {}
    p_direct, p_shim, p_plain, p_edge, p_relay = (free_port() for _ in range(5))
    sock = work / "iperf-handoff.sock"
    with started(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(p_direct)], work / "iperf-direct.log"):
        wait_for(lambda: tcp_open(p_direct))
        out["direct_gbps"] = iperf_gbps(p_direct, seconds)
    with started(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(p_shim)], work / "iperf-shim.log",
                 shim_env(p_shim, sock)), \
            started(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(p_plain)], work / "iperf-plain.log"), \
            edge(work, "edge-bulk", f"""
[handoffs.iperf]
socket = "{sock}"

[services.handoff]
listen = ["127.0.0.1:{p_edge}"]
to = "iperf"

[services.relay]
listen = ["127.0.0.1:{p_relay}"]
to = "127.0.0.1:{p_plain}"
""", p_edge):
        wait_for(lambda: sock.exists() and tcp_open(p_plain) and tcp_open(p_edge) and tcp_open(p_relay))
        out["handoff_gbps"] = iperf_gbps(p_edge, seconds)
        out["relay_gbps"] = iperf_gbps(p_relay, seconds)
    out["handoff_vs_direct"] = out["handoff_gbps"] / out["direct_gbps"]
    return out


def conn_rate(tools: dict[str, Path], hello: Path, port: int, seconds: int, pids: list[int]) -> tuple[float, float]:
    """(connections/s, proxy CPU s per 1k connections)."""
    cpu0 = cpu_seconds(pids)
    out = subprocess.run([str(tools["connrate"]), "127.0.0.1", str(port), "50", str(seconds), "10000000", str(hello)],
                         capture_output=True, text=True, timeout=seconds + 30, check=True)
    cpu = cpu_seconds(pids) - cpu0
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["failed"] > 0.01 * max(1, result["connections"]):
        raise RuntimeError(f"{result['failed']} failed connections: {result['errors']}")
    return float(result["conn_per_s"]), cpu / (result["connections"] / 1000)


def rates(work: Path, tools: dict[str, Path], seconds: int) -> dict[str, float]:
    hello = work / "hello.bin"
    hello.write_bytes(client_hello(SNI)[0])
    p_echo_shim, p_echo, p_edge, p_relay, p_haproxy = (free_port() for _ in range(5))
    sock = work / "echo-handoff.sock"
    haproxy_cfg = work / "haproxy.cfg"
    haproxy_cfg.write_text(haproxy_config(p_haproxy, p_echo))
    out: dict[str, float] = {}
    with started([str(tools["tcpecho"]), str(p_echo_shim)], work / "echo-shim.log", shim_env(p_echo_shim, sock)), \
            started([str(tools["tcpecho"]), str(p_echo)], work / "echo.log"), \
            started(["haproxy", "-db", "-f", str(haproxy_cfg)], work / "haproxy.log") as haproxy, \
            edge(work, "edge-rate", f"""
[handoffs.echo]
socket = "{sock}"
max_in_flight = 256

[services.handoff]
listen = ["127.0.0.1:{p_edge}"]
names = ["{SNI}"]
to = "echo"

[services.relay]
listen = ["127.0.0.1:{p_relay}"]
names = ["{SNI}"]
to = "127.0.0.1:{p_echo}"
""", p_edge) as ew:
        wait_for(lambda: sock.exists() and all(tcp_open(p) for p in (p_echo, p_edge, p_relay, p_haproxy)))
        for name, port, pid in (("handoff", p_edge, ew.pid), ("haproxy", p_haproxy, haproxy.pid),
                                ("relay", p_relay, ew.pid)):
            cps, cpu = conn_rate(tools, hello, port, seconds, [pid])
            out[f"{name}_conn_per_s"] = cps
            out[f"{name}_cpu_s_per_1k"] = cpu
    out["handoffs_vs_haproxy"] = out["handoff_conn_per_s"] / out["haproxy_conn_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, short runs")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    for exe in ("iperf3", "haproxy"):
        if shutil.which(exe) is None:
            sys.exit(f"{exe} is not installed (make peers)")
    subprocess.run(["make", "-s", "shim"], cwd=ROOT, check=True, timeout=120)
    if not SHIM.exists():
        sys.exit("the handoff shim did not build (no C compiler?)")
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-handoff-") as tmp:
        work = Path(tmp)
        tools, why = ctools.build(work / "tools")
        if why:
            sys.exit(why)
        for r in range(rounds):
            one = {**throughput(work, 2 if args.quick else 5), **rates(work, tools, 2 if args.quick else 5)}
            runs.append(one)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in one.items()), flush=True)
    summary = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    print("\nmedians of", rounds, "round(s):")
    for k, v in summary.items():
        print(f"  {k:28} {v:,.3f}")
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
