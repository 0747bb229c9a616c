"""Short-connection rate with two data-plane processes or threads (issue 12): edgeward
`workers = 2` vs HAProxy `nbthread 2` vs nginx stream `worker_processes 2`, and edgeward
`workers = 1` for the CPU per connection with one process.

    python bench/workers.py [--quick] [--rounds 3] [--seconds 5]

Each round runs every contestant once, interleaved in the same order: bench/tools/connrate.c,
50 concurrent loops of connect, TLS ClientHello with SNI `bench.example.org`, read its echo
from bench/tools/tcpecho.c, close, for `--seconds` (2 quick). Every proxy routes by SNI
(HAProxy `req.ssl_sni`, nginx `ssl_preread`, edgeward `names`). CPU is each proxy's own
accounting (utime+stime over master and workers), per 1k connections.

On a 2-CPU machine the client, the echo server and the proxy's two processes share the two
CPUs: the rates are capped by the rig, and two workers cannot be twice one. The CPU per 1k
connections has no such cap; the printed `cpus` says how many the run had. Each contestant gets
a 1 s warm-up run first (not counted).

Everything runs on 127.0.0.1 high ports; every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import ctools  # noqa: E402
from bench.contestants import nginx_stream_module_line  # noqa: E402
from bench.handoff import SNI, conn_rate, free_port, haproxy_config, started, tcp_open  # noqa: E402
from bench.hello import client_hello  # noqa: E402
from bench.procs import tree, wait_for  # noqa: E402

CONTESTANTS = ("haproxy_nbthread2", "nginx_workers2", "edgeward_workers2", "edgeward_workers1")


def nginx_config(work: Path, port: int, echo: int) -> str:
    return f"""{nginx_stream_module_line()}
daemon off;
master_process on;
worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
stream {{
    proxy_connect_timeout 5s;
    proxy_timeout 1m;
    upstream echo {{ server 127.0.0.1:{echo}; }}
    map $ssl_preread_server_name $rate_upstream {{
        {SNI} echo;
        default 127.0.0.1:1;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        ssl_preread on;
        proxy_pass $rate_upstream;
    }}
}}
"""


def edgeward_config(work: Path, name: str, workers: int, port: int, echo: int) -> str:
    return f"""[edge]
admin = "unix:{work}/{name}-admin.sock"
state_dir = "{work}/{name}-state"
log_level = "warning"
workers = {workers}
max_connections_per_client = 20000

[services.rate]
listen = ["127.0.0.1:{port}"]
names = ["{SNI}"]
to = "127.0.0.1:{echo}"
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    rounds, seconds = (1, 2) if args.quick else (args.rounds, args.seconds)
    for exe in ("haproxy", "nginx"):
        if shutil.which(exe) is None and not Path(f"/usr/sbin/{exe}").exists():
            sys.exit(f"{exe} is not installed (make peers)")
    runs: dict[str, list[tuple[float, float]]] = {c: [] for c in CONTESTANTS}
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-workers-") as tmp:
        work = Path(tmp)
        tools, why = ctools.build(work / "tools")
        if why:
            sys.exit(why)
        hello = work / "hello.bin"
        hello.write_bytes(client_hello(SNI)[0])
        echo = free_port()
        ports = {c: free_port() for c in CONTESTANTS}
        (work / "haproxy.cfg").write_text(haproxy_config(ports["haproxy_nbthread2"], echo, nbthread=2))
        (work / "nginx.conf").write_text(nginx_config(work, ports["nginx_workers2"], echo))
        argv: dict[str, list[str]] = {
            "haproxy_nbthread2": ["haproxy", "-db", "-f", str(work / "haproxy.cfg")],
            "nginx_workers2": ["nginx", "-c", str(work / "nginx.conf"), "-e", str(work / "nginx-error.log")],
        }
        for name, n in (("edgeward_workers2", 2), ("edgeward_workers1", 1)):
            cfg = work / f"{name}.toml"
            cfg.write_text(edgeward_config(work, name, n, ports[name], echo))
            argv[name] = [sys.executable, "-m", "edgeward.cli", "run", str(cfg)]
        with started([str(tools["tcpecho"]), str(echo)], work / "echo.log"):
            wait_for(lambda: tcp_open(echo))
            for rnd in range(rounds):
                for name in CONTESTANTS:
                    with started(argv[name], work / f"{name}.log") as proc:
                        what = f"{name} (round {rnd + 1})"
                        try:
                            wait_for(lambda name=name: tcp_open(ports[name]), 30, what)  # type: ignore[misc]
                            if name.startswith("edgeward_workers2") or name.startswith("nginx"):
                                wait_for(lambda proc=proc: len(tree(proc.pid)) >= 3, 30,  # type: ignore[misc]
                                         f"{what}: its worker processes")
                        except TimeoutError as e:
                            tail = (work / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
                            raise TimeoutError(f"{e}; exit status {proc.poll()}; its log ends: {tail}") from None
                        # Warm-up, not counted: edgeward's master holds the listening sockets before
                        # its workers have started, so an open port does not mean a started worker.
                        conn_rate(tools, hello, ports[name], 1, tree(proc.pid))
                        pids = tree(proc.pid)
                        cps, cpu = conn_rate(tools, hello, ports[name], seconds, pids)
                        runs[name].append((cps, cpu))
                        print(f"round {rnd + 1} {name:18} {cps:9,.0f} conn/s  {cpu:.4f} CPU-s/1k "
                              f"({len(pids)} processes)", flush=True)
    summary: dict[str, float] = {"cpus": float(len(os.sched_getaffinity(0)))}
    for name, rs in runs.items():
        summary[f"{name}_conn_per_s"] = statistics.median(r[0] for r in rs)
        summary[f"{name}_cpu_s_per_1k"] = statistics.median(r[1] for r in rs)
    summary["edgeward2_vs_haproxy2_rate"] = summary["edgeward_workers2_conn_per_s"] / summary["haproxy_nbthread2_conn_per_s"]
    summary["edgeward2_vs_nginx2_rate"] = summary["edgeward_workers2_conn_per_s"] / summary["nginx_workers2_conn_per_s"]
    summary["edgeward_cpu_per_conn_2_vs_1"] = (summary["edgeward_workers2_cpu_s_per_1k"]
                                               / summary["edgeward_workers1_cpu_s_per_1k"])
    print(f"\nmedians of {rounds} round(s), {seconds} s each, on {int(summary['cpus'])} CPUs "
          "(client, echo server and proxy share them):")
    for k, v in summary.items():
        print(f"  {k:34} {v:,.4f}")
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
