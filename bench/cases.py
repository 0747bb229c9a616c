"""The measurements. Each case runs every contestant once per round, in the
same order every round (A B C D, A B C D, ...), so slow drift of the machine
(thermal, noisy neighbours) hits every contestant alike.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import select
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.certs import cert_files
from bench.contestants import HTTP_BODY, Contestant, supports_udp, template_values
from bench.hello import client_hello
from bench.iperf import IperfError, parse_iperf_json, parse_iperf_udp_json
from bench.procs import Proc, ProcessGroup, children, cpu_seconds, memory_kb, wait_port
from bench.templating import render_file
from bench.wrk import WrkError, WrkResult, parse_wrk, wrk_argv

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent


@dataclass(frozen=True)
class Metric:
    label: str
    unit: str
    better: str  # "higher" | "lower"


# Every metric a case can report; the report renders them in this order.
METRICS: dict[str, Metric] = {
    "gbit_s_p1": Metric("TCP bulk, 1 stream (iperf3)", "Gbit/s", "higher"),
    "gbit_s_p8": Metric("TCP bulk, 8 streams (iperf3)", "Gbit/s", "higher"),
    "cpu_s_per_gb_p1": Metric("CPU per GB relayed, 1 stream", "CPU s/GB", "lower"),
    "cpu_s_per_gb_p8": Metric("CPU per GB relayed, 8 streams", "CPU s/GB", "lower"),
    "conn_per_s": Metric("Short connections/s, SNI-routed, c=50", "conn/s", "higher"),
    "cpu_s_per_1k_conn": Metric("CPU per 1k short connections", "CPU s/1k", "lower"),
    "rss_start_kb": Metric("RSS at start", "KiB", "lower"),
    "rss_after_burst_kb": Metric("RSS 3 s after the idle connections closed (9,000)", "KiB", "lower"),
    "kb_per_conn": Metric("Memory per idle relayed connection (RSS)", "KiB/conn", "lower"),
    "pss_kb_per_conn": Metric("Memory per idle relayed connection (PSS)", "KiB/conn", "lower"),
    "udp_pps_flat": Metric("UDP datagrams/s received, flat out (-b 0)", "pkt/s", "higher"),
    "udp_loss_flat": Metric("UDP loss, flat out", "%", "lower"),
    "udp_pps_paced": Metric("UDP datagrams/s received, paced 50k/s", "pkt/s", "higher"),
    "udp_loss_paced": Metric("UDP loss, paced 50k/s", "%", "lower"),
    "cpu_s_per_1m_pkt_flat": Metric(
        "CPU per 1M UDP datagrams relayed, flat out", "CPU s/1M", "lower"
    ),
    "cpu_s_per_1m_pkt_paced": Metric(
        "CPU per 1M UDP datagrams relayed, paced", "CPU s/1M", "lower"
    ),
    "http_req_per_s": Metric(
        "HTTP keep-alive requests/s, 100-byte body, c=50 (wrk)", "req/s", "higher"
    ),
    "http_p50_ms": Metric("HTTP keep-alive latency p50", "ms", "lower"),
    "http_p99_ms": Metric("HTTP keep-alive latency p99", "ms", "lower"),
    "cpu_s_per_1k_http_req": Metric("CPU per 1k HTTP keep-alive requests", "CPU s/1k", "lower"),
    "https_req_per_s": Metric(
        "HTTPS keep-alive requests/s (TLS 1.3 at the proxy), c=50 (wrk)", "req/s", "higher"
    ),
    "https_p50_ms": Metric("HTTPS keep-alive latency p50", "ms", "lower"),
    "https_p99_ms": Metric("HTTPS keep-alive latency p99", "ms", "lower"),
    "cpu_s_per_1k_https_req": Metric("CPU per 1k HTTPS keep-alive requests", "CPU s/1k", "lower"),
    "tls_handshakes_per_s": Metric(
        "New TLS 1.3 connections/s (ECDSA P-256, one request each), c=50 (wrk)",
        "conn/s",
        "higher",
    ),
    "cpu_s_per_1k_handshakes": Metric(
        "CPU per 1k new TLS connections (handshake + one request)", "CPU s/1k", "lower"
    ),
    "kb_per_http_conn": Metric(
        "Memory per idle HTTP keep-alive client connection (RSS)", "KiB/conn", "lower"
    ),
    "pss_kb_per_http_conn": Metric(
        "Memory per idle HTTP keep-alive client connection (PSS)", "KiB/conn", "lower"
    ),
    "kb_per_ws": Metric("Memory per idle websocket (RSS)", "KiB/ws", "lower"),
    "pss_kb_per_ws": Metric("Memory per idle websocket (PSS)", "KiB/ws", "lower"),
}


@dataclass
class Context:
    group: ProcessGroup
    contestants: list[Contestant]
    ports: dict[str, int]
    workdir: Path
    rounds: int
    quick: bool
    # CPU sets for the clients, the upstream servers and the proxies; None = unpinned.
    client_cpus: set[int] | None = None
    upstream_cpus: set[int] | None = None
    proxy_cpus: set[int] | None = None
    # Cases that use the CPU sets above; the others let the scheduler place everything.
    pinned_cases: frozenset[str] = frozenset()
    idle_connections: int = 9000
    # C helpers from bench/tools/ (see bench/ctools.py); empty: the Python ones.
    tools: dict[str, Path] = field(default_factory=dict)
    log: Callable[[str], None] = print
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def cpus(self, role: str, case: str) -> set[int] | None:
        """CPU set for "client", "upstream" or "proxy" processes in this case."""
        if case not in self.pinned_cases:
            return None
        return {
            "client": self.client_cpus,
            "upstream": self.upstream_cpus,
            "proxy": self.proxy_cpus,
        }[role]

    def place_proxies(self, case: str) -> None:
        """Pin the running proxies for this case, or free them on every CPU."""
        cpus = self.cpus("proxy", case) or os.sched_getaffinity(0)
        for c in self.contestants:
            for pid in c.pids():
                try:
                    os.sched_setaffinity(pid, cpus)
                except OSError:
                    pass  # a worker that just exited

    def record(
        self,
        case: str,
        contestant: str,
        rnd: int,
        metrics: dict[str, float],
        raw: dict[str, Any],
        error: str | None = None,
    ) -> None:
        run: dict[str, Any] = {
            "contestant": contestant,
            "round": rnd,
            "metrics": metrics,
            "raw": raw,
            "at": time.time(),
            # Other work on the machine during this run shows here (explains outliers).
            "loadavg": os.getloadavg(),
        }
        if error:
            run["error"] = error
        self.runs.setdefault(case, []).append(run)
        # jail_lines reports dozens of numbers; the console shows only its rates.
        shown = ", ".join(
            f"{k}={v:.4g}"
            for k, v in metrics.items()
            if case != "jail_lines" or k.endswith(("lines_per_s", "ratio"))
        )
        self.log(
            f"  [{case} r{rnd + 1}] {contestant:9s} {shown}{'  ERROR ' + error if error else ''}"
        )


def python() -> str:
    return sys.executable


def bench_env() -> dict[str, str]:
    """Environment for our helper scripts: `bench` importable from any cwd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH")]))
    return env


def _settle(seconds: float = 0.5) -> None:
    """A pause between runs so one run's teardown (TIME_WAIT, freed buffers) is not
    charged to the next contestant."""
    time.sleep(seconds)


# --- tcp_bulk -----------------------------------------------------------------


def tcp_bulk(ctx: Context) -> None:
    seconds = 2 if ctx.quick else 5
    server = ctx.group.start(
        "iperf3-server",
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(ctx.ports["iperf"])],
        cpus=ctx.cpus("upstream", "tcp_bulk"),
    )
    ctx.place_proxies("tcp_bulk")
    try:
        wait_port(ctx.ports["iperf"], proc=server)
        for rnd in range(ctx.rounds):
            for streams in (1, 8):
                for c in ctx.contestants:
                    _one_iperf(ctx, c, rnd, streams, seconds)
                    _settle()
    finally:
        ctx.group.stop(server)


def _one_iperf(ctx: Context, c: Contestant, rnd: int, streams: int, seconds: int) -> None:
    argv = [
        "iperf3",
        "-c",
        "127.0.0.1",
        "-p",
        str(c.port("bulk")),
        "-t",
        str(seconds),
        "-P",
        str(streams),
        "-J",
    ]
    pids = c.pids()
    raw: dict[str, Any] = {"argv": argv}
    for attempt in range(2):
        cpu0 = cpu_seconds(pids)
        try:
            out = _run_pinned(argv, ctx.cpus("client", "tcp_bulk"), timeout=seconds + 20)
            result = parse_iperf_json(out.stdout)
        except (IperfError, subprocess.TimeoutExpired) as e:
            # "the server is busy" right after the previous test: one retry.
            if attempt == 0 and "busy" in str(e):
                time.sleep(1)
                continue
            ctx.record("tcp_bulk", c.name, rnd, {}, raw, error=str(e))
            return
        cpu = cpu_seconds(pids) - cpu0
        break
    metrics = {f"gbit_s_p{streams}": result.gbit_per_s}
    raw.update(
        bytes=result.bytes_received,
        seconds=result.seconds,
        retransmits=result.retransmits,
        streams=streams,
    )
    if pids:
        raw["proxy_cpu_s"] = cpu
        metrics[f"cpu_s_per_gb_p{streams}"] = cpu / (result.bytes_received / 1e9)
    ctx.record("tcp_bulk", c.name, rnd, metrics, raw)


def _run_pinned(
    argv: list[str], cpus: set[int] | None, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=pin,
        env=env,
        start_new_session=True,
    )


# --- udp -----------------------------------------------------------------------------

# iperf3 -u modes: (name, -b). 200-byte datagrams; iperf3's -b counts payload bits, so
# 80 Mbit/s is 80e6 / (200 * 8) = 50,000 datagrams/s. -b 0: as fast as the client can.
UDP_LEN = 200
UDP_MODES = (("flat", "0"), ("paced", "80M"))


def udp_argv(port: int, bitrate: str, seconds: int) -> list[str]:
    return [
        "iperf3",
        "-c",
        "127.0.0.1",
        "-p",
        str(port),
        "-u",
        "-b",
        bitrate,
        "-l",
        str(UDP_LEN),
        "-t",
        str(seconds),
        "-J",
    ]


def udp_metrics(mode: str, result: Any, proxy_cpu: float | None) -> dict[str, float]:
    """Metrics of one iperf3 -u run (a bench.iperf.UdpResult), as the server saw it."""
    metrics = {
        f"udp_pps_{mode}": result.packets_per_s,
        f"udp_loss_{mode}": result.lost_percent,
    }
    if proxy_cpu is not None and result.received_packets:
        metrics[f"cpu_s_per_1m_pkt_{mode}"] = proxy_cpu / (result.received_packets / 1e6)
    return metrics


def udp(ctx: Context) -> None:
    """iperf3 -u through each contestant that forwards UDP (not HAProxy 2.6), flat out
    and paced; datagrams/s and loss from the iperf3 server's own summary."""
    seconds = 2 if ctx.quick else 5
    contestants = [c for c in ctx.contestants if supports_udp(c.name)]
    skipped = [c.name for c in ctx.contestants if not supports_udp(c.name)]
    if skipped:
        ctx.log(f"  [udp] {', '.join(skipped)}: no UDP proxying, not measured")
    server = ctx.group.start(
        "iperf3-udp-server",
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(ctx.ports["iperf_udp"])],
        cpus=ctx.cpus("upstream", "udp"),
    )
    ctx.place_proxies("udp")
    try:
        wait_port(ctx.ports["iperf_udp"], proc=server)
        for rnd in range(ctx.rounds):
            for mode, bitrate in UDP_MODES:
                for c in contestants:
                    _one_udp(ctx, c, rnd, mode, bitrate, seconds)
                    # A flat-out run leaves full socket buffers behind: let them drain.
                    _settle(1.0)
    finally:
        ctx.group.stop(server)


# After a failed run other than "busy": wait this long, then one retry. edgeward's
# passive health (default 3 failures -> down for 10 s) counts the ICMP port-unreachable
# errors of the datagrams it still flushes after iperf3's server closed the previous
# test's UDP socket, and marks the only server down: the next test's TCP control
# connection is then refused. The retry keeps the rate measurable; the first failure
# stays in the run's error (listed under the table), not hidden.
UDP_RETRY_AFTER = 11.0


def _one_udp(ctx: Context, c: Contestant, rnd: int, mode: str, bitrate: str, seconds: int) -> None:
    argv = udp_argv(c.port("udp"), bitrate, seconds)
    pids = c.pids()
    raw: dict[str, Any] = {"argv": argv, "mode": mode}
    first_error: str | None = None
    busy_retried = False
    while True:
        cpu0 = cpu_seconds(pids)
        out = None
        try:
            out = _run_pinned(argv, ctx.cpus("client", "udp"), timeout=seconds + 20)
            result = parse_iperf_udp_json(out.stdout)
        except (IperfError, subprocess.TimeoutExpired) as e:
            if not busy_retried and "busy" in str(e):
                busy_retried = True
                time.sleep(1)
                continue
            if out is not None:
                # How far the test got (intervals, partial end) tells where it broke.
                raw.update(
                    exit=out.returncode, stdout=out.stdout[-20000:], stderr=out.stderr[-2000:]
                )
            if first_error is None:
                first_error = str(e)
                raw["first_error"] = first_error
                time.sleep(UDP_RETRY_AFTER)
                continue
            ctx.record("udp", c.name, rnd, {}, raw, error=f"{first_error}; retry: {e}")
            return
        cpu = cpu_seconds(pids) - cpu0
        break
    for key in ("exit", "stdout", "stderr"):
        raw.pop(key, None)
    raw.update(
        seconds=result.seconds,
        send_seconds=result.send_seconds,
        packets=result.packets,
        lost_packets=result.lost_packets,
        bytes=result.bytes_received,
    )
    if pids:
        raw["proxy_cpu_s"] = cpu
    error = None
    if first_error is not None:
        error = f"first attempt failed ({first_error}); measured on a retry {UDP_RETRY_AFTER:.0f}s later"
    if result.received_packets == 0:
        error = "no datagram reached the iperf3 server"
    ctx.record(
        "udp", c.name, rnd, udp_metrics(mode, result, cpu if pids else None), raw, error=error
    )


# --- upstream echo server (conn_rate, idle_memory) ----------------------------------


def start_echo(ctx: Context, case: str) -> Any:
    if "tcpecho" in ctx.tools:
        argv = [str(ctx.tools["tcpecho"]), str(ctx.ports["echo"])]
    else:
        argv = [python(), "-m", "bench.echo", "--port", str(ctx.ports["echo"])]
    echo = ctx.group.start("echo", argv, cpus=ctx.cpus("upstream", case), env=bench_env())
    wait_port(ctx.ports["echo"], proc=echo)
    return echo


# --- conn_rate ------------------------------------------------------------------


def conn_rate(ctx: Context) -> None:
    seconds = 2 if ctx.quick else 5
    echo = start_echo(ctx, "conn_rate")
    ctx.place_proxies("conn_rate")
    try:
        for rnd in range(ctx.rounds):
            for c in ctx.contestants:
                _one_conn_rate(ctx, c, rnd, seconds)
                _settle(1.0)
    finally:
        ctx.group.stop(echo)


def conn_rate_argv(ctx: Context, port: int, seconds: int) -> tuple[list[str], str]:
    """The client command line and which ClientHello builder made its hello."""
    if "connrate" not in ctx.tools:
        argv = [
            python(),
            "-m",
            "bench.connrate",
            "--port",
            str(port),
            "--concurrency",
            "50",
            "--duration",
            str(seconds),
        ]
        return argv, client_hello("bench.example.org")[1]
    hello_file = ctx.workdir / "clienthello.bin"
    hello, builder = client_hello("bench.example.org")
    hello_file.write_bytes(hello)
    argv = [
        str(ctx.tools["connrate"]),
        "127.0.0.1",
        str(port),
        "50",
        str(seconds),
        "10000000",
        str(hello_file),
    ]
    return argv, builder


def _one_conn_rate(ctx: Context, c: Contestant, rnd: int, seconds: int) -> None:
    argv, builder = conn_rate_argv(ctx, c.port("rate"), seconds)
    pids = c.pids()
    cpu0 = cpu_seconds(pids)
    try:
        out = _run_pinned(
            argv, ctx.cpus("client", "conn_rate"), timeout=seconds + 30, env=bench_env()
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        ctx.record("conn_rate", c.name, rnd, {}, {"argv": argv}, error=f"client: {e}")
        return
    cpu = cpu_seconds(pids) - cpu0
    metrics = {"conn_per_s": float(result["conn_per_s"])}
    raw = {"argv": argv, "hello_builder": builder, **result}
    if pids and result["connections"]:
        raw["proxy_cpu_s"] = cpu
        metrics["cpu_s_per_1k_conn"] = cpu / (result["connections"] / 1000)
    error = None
    # A proxy that refuses part of the load must not look fast: flag it loudly.
    if result["failed"] > 0.01 * max(1, result["connections"]):
        error = f"{result['failed']} failed connections: {result['errors']}"
    ctx.record("conn_rate", c.name, rnd, metrics, raw, error=error)


# --- idle_memory ------------------------------------------------------------------


def idle_memory(ctx: Context) -> None:
    echo = start_echo(ctx, "idle_memory")
    try:
        for rnd in range(ctx.rounds):
            for c in ctx.contestants:
                if c.name == "direct":
                    continue  # no proxy process to weigh
                _one_idle(ctx, c, rnd)
                _settle(1.0)
    finally:
        ctx.group.stop(echo)


def _hold(
    ctx: Context,
    port: int,
    count: int,
    case: str = "idle_memory",
    module: str = "bench.idlehold",
    extra: tuple[str, ...] = (),
) -> tuple[Proc, dict[str, Any]]:
    """Start a holder client (bench.idlehold or bench.httphold, owned by the run's
    ProcessGroup, so Ctrl-C stops it too) and wait until its connections are open."""
    argv = [python(), "-m", module, "--port", str(port), "--count", str(count), *extra]
    holder = ctx.group.start(
        module.rsplit(".", 1)[-1],
        argv,
        cpus=ctx.cpus("client", case),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=bench_env(),
    )
    ready = _read_line(holder, prefix="READY ", timeout=120)
    return holder, json.loads(ready[len("READY ") :])


def _release(ctx: Context, holder: Proc) -> dict[str, Any]:
    """Tell the holder to close its connections, wait for it, stop it by PID; the
    JSON after its `DONE`, if any (bench.httphold says how many were still open)."""
    stdin = holder.popen.stdin
    done: dict[str, Any] = {}
    try:
        assert stdin is not None
        stdin.write(b"\n")
        stdin.flush()
        line = _read_line(holder, prefix="DONE", timeout=30)
        rest = line[len("DONE") :].strip()
        if rest:
            done = json.loads(rest)
    except (OSError, TimeoutError, json.JSONDecodeError):
        pass
    finally:
        ctx.group.stop(holder)
    return done


def _read_line(proc: Proc, prefix: str, timeout: float) -> str:
    """The first stdout line starting with prefix, read from the raw descriptor so
    that select() sees every byte (no hidden buffering)."""
    stdout = proc.popen.stdout
    assert stdout is not None
    fd = stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            raise TimeoutError(
                f"{proc.name} exited ({proc.popen.poll()}) before {prefix!r}:\n{proc.log_tail()}"
            )
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode(errors="replace")
            if text.startswith(prefix):
                return text.strip()
    raise TimeoutError(f"no {prefix!r} from {proc.name} within {timeout}s")


def _one_idle(ctx: Context, c: Contestant, rnd: int) -> None:
    # A fresh proxy per measurement: its "at start" memory is really at start and
    # nothing left over from the other cases (pools, caches) hides per-connection cost.
    c.stop(ctx.group)
    c.start(ctx.group, ctx.ports, ctx.workdir, ctx.cpus("proxy", "idle_memory"))
    pids = c.pids()
    time.sleep(0.5)
    start = memory_kb(pids)
    # Warm-up: the first connections pay one-off costs (lazy imports, pools); charge
    # them to the baseline, not to the 9,000.
    holder, _ = _hold(ctx, c.port("idle"), 100)
    _release(ctx, holder)
    time.sleep(0.5)
    idle = memory_kb(pids)
    raw: dict[str, Any] = {"mem_start": start, "mem_idle": idle}
    holder, opened = _hold(ctx, c.port("idle"), ctx.idle_connections)
    try:
        time.sleep(1.0)  # let the proxy finish whatever it does after the last echo
        pids = c.pids()
        with_conns = memory_kb(pids)
        raw.update(mem_with=with_conns, hold=opened)
    finally:
        _release(ctx, holder)
    # Long enough for a proxy that gives memory back once the burst is over (edgeward checks each
    # second and waits for the count to settle) to have done so.
    time.sleep(3.0)
    raw["mem_after_close"] = after = memory_kb(c.pids())
    n = opened["open"]
    metrics: dict[str, float] = {"rss_start_kb": float(start["rss_kb"]),
                                 "rss_after_burst_kb": float(after["rss_kb"])}
    error = None
    if n:
        metrics["kb_per_conn"] = (with_conns["rss_kb"] - idle["rss_kb"]) / n
        metrics["pss_kb_per_conn"] = (with_conns["pss_kb"] - idle["pss_kb"]) / n
    if n < ctx.idle_connections:
        error = (
            f"only {n} of {ctx.idle_connections} connections relayed ({opened['failed']} failed)"
        )
    ctx.record("idle_memory", c.name, rnd, metrics, raw, error=error)


# --- HTTP cases (issue 8): http_keepalive, https_keepalive, tls_handshakes, http_idle_memory


def start_http_upstream(ctx: Context, case: str) -> Proc:
    """The nginx web upstream (bench/configs/nginx-upstream.conf.tmpl): a fixed
    100-byte body on plain HTTP and, for `direct`, on TLS."""
    values = template_values("nginx-upstream", ctx.ports, ctx.workdir)
    cfg = render_file("nginx-upstream.conf", values, ctx.workdir)
    proc = ctx.group.start(
        "nginx-upstream",
        ["nginx", "-p", str(ctx.workdir), "-e", "stderr", "-c", str(cfg)],
        cpus=ctx.cpus("upstream", case),
    )
    for name in ("http_upstream", "https_upstream"):
        wait_port(ctx.ports[name], proc=proc)
    return proc


def start_wsecho(ctx: Context, case: str) -> Proc:
    argv = [python(), "-m", "bench.wsecho", "--port", str(ctx.ports["ws_upstream"])]
    proc = ctx.group.start("wsecho", argv, cpus=ctx.cpus("upstream", case), env=bench_env())
    wait_port(ctx.ports["ws_upstream"], proc=proc)
    return proc


@dataclass(frozen=True)
class WrkCase:
    """One wrk measurement: which listener, keep-alive or one request per connection."""

    name: str
    listener: str  # "http" or "https" (the contestant's listener, and the URL scheme)
    close: bool  # `Connection: close` on every request: a new connection each time

    def metrics(self, result: WrkResult, proxy_cpu: float | None) -> dict[str, float]:
        """Good (2xx/3xx) responses per second, wrk's latency percentiles, and the
        proxy's CPU per 1k good responses."""
        ok = result.requests - result.non_2xx
        if self.close:
            # Each response ends its connection: responses/s = new connections/s. wrk's
            # latency clock starts after the handshake, so it is left to the raw data.
            metrics = {"tls_handshakes_per_s": result.ok_per_s}
            if proxy_cpu is not None and ok > 0:
                metrics["cpu_s_per_1k_handshakes"] = proxy_cpu / (ok / 1000)
            return metrics
        p = self.listener
        metrics = {f"{p}_req_per_s": result.ok_per_s}
        for q in ("p50", "p99"):
            if q in result.latency_ms:
                metrics[f"{p}_{q}_ms"] = result.latency_ms[q]
        if proxy_cpu is not None and ok > 0:
            metrics[f"cpu_s_per_1k_{p}_req"] = proxy_cpu / (ok / 1000)
        return metrics


WRK_CASES = {
    "http_keepalive": WrkCase("http_keepalive", "http", close=False),
    "https_keepalive": WrkCase("https_keepalive", "https", close=False),
    "tls_handshakes": WrkCase("tls_handshakes", "https", close=True),
}


class ProbeError(RuntimeError):
    pass


def probe_http(port: int, tls: bool, cert_der: bytes | None = None) -> dict[str, Any]:
    """One GET through a contestant before it is measured: status 200, the upstream's
    exact body, and with TLS the run's certificate and TLS 1.3. A proxy that answers
    fast with an error page or the wrong certificate never gets a number."""
    conn: http.client.HTTPConnection
    if tls:
        ctx = ssl.create_default_context()
        # The certificate is checked below by its bytes, not by a chain.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": "bench.test", "User-Agent": "bench-probe"})
        resp = conn.getresponse()
        body = resp.read()
        info: dict[str, Any] = {"status": resp.status, "server": resp.getheader("Server")}
        if tls:
            sock = conn.sock
            assert isinstance(sock, ssl.SSLSocket)
            info["tls_version"] = sock.version()
            cipher = sock.cipher()
            info["cipher"] = cipher[0] if cipher else None
            if cert_der is not None and sock.getpeercert(binary_form=True) != cert_der:
                raise ProbeError("the server's certificate is not the run's certificate")
            if info["tls_version"] != "TLSv1.3":
                raise ProbeError(f"negotiated {info['tls_version']}, not TLSv1.3")
    except (OSError, http.client.HTTPException) as e:
        raise ProbeError(f"{type(e).__name__}: {e}") from e
    finally:
        conn.close()
    if resp.status != 200 or body != HTTP_BODY:
        raise ProbeError(f"status {resp.status}, body {body[:80]!r} (expected the upstream's)")
    return info


def _url(c: Contestant, spec: WrkCase) -> str:
    return f"{spec.listener}://127.0.0.1:{c.port(spec.listener)}/"


def wrk_case(ctx: Context, spec: WrkCase) -> None:
    """wrk through every contestant, interleaved; each contestant is probed once first
    and warmed up with a 1 s run (pools filled, lazy code paths taken) not counted."""
    seconds = 3 if ctx.quick else 10
    upstream = start_http_upstream(ctx, spec.name)
    ctx.place_proxies(spec.name)
    cert_der = cert_files(ctx.workdir).der()
    try:
        measured: list[tuple[Contestant, dict[str, Any]]] = []
        for c in ctx.contestants:
            if not _has_listener(ctx, spec.name, c, spec.listener):
                continue
            try:
                probe = probe_http(c.port(spec.listener), spec.listener == "https", cert_der)
            except ProbeError as e:
                ctx.record(spec.name, c.name, 0, {}, {"url": _url(c, spec)}, error=f"probe: {e}")
                continue
            measured.append((c, probe))
        for c, _ in measured:
            warm = wrk_argv(_url(c, spec), 1, close=spec.close)
            with contextlib.suppress(subprocess.TimeoutExpired):
                _run_pinned(warm, ctx.cpus("client", spec.name), timeout=30)
        for rnd in range(ctx.rounds):
            for c, probe in measured:
                _one_wrk(ctx, spec, c, rnd, seconds, probe, upstream)
                # Connection: close runs leave thousands of TIME_WAIT sockets behind.
                _settle(2.0 if spec.close else 1.0)
    finally:
        ctx.group.stop(upstream)


def _has_listener(ctx: Context, case: str, c: Contestant, listener: str) -> bool:
    """Whether the contestant's config opens this listener; if not, say so in the
    results (an error run without metrics) rather than leaving it silently out."""
    if listener in c.ports:
        return True
    why = f"no {listener} listener in its config (bench/configs/): not measured"
    ctx.record(case, c.name, 0, {}, {}, error=why)
    return False


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _one_wrk(
    ctx: Context,
    spec: WrkCase,
    c: Contestant,
    rnd: int,
    seconds: int,
    probe: dict[str, Any],
    upstream: Proc,
) -> None:
    argv = wrk_argv(_url(c, spec), seconds, close=spec.close)
    pids = c.pids()
    raw: dict[str, Any] = {"argv": argv, "probe": probe}
    cpu0 = cpu_seconds(pids)
    up0 = cpu_seconds([upstream.pid, *children(upstream.pid)])
    # wrk is the only child reaped meanwhile (the servers run on): its own CPU time.
    client0 = _children_cpu()
    try:
        out = _run_pinned(argv, ctx.cpus("client", spec.name), timeout=seconds + 60)
        result = parse_wrk(out.stdout)
    except (subprocess.TimeoutExpired, WrkError) as e:
        ctx.record(spec.name, c.name, rnd, {}, raw, error=f"wrk: {e}")
        return
    cpu = cpu_seconds(pids) - cpu0
    raw.update(
        wrk=result.as_dict(),
        upstream_cpu_s=cpu_seconds([upstream.pid, *children(upstream.pid)]) - up0,
        client_cpu_s=_children_cpu() - client0,
    )
    if pids:
        raw["proxy_cpu_s"] = cpu
    failures = result.non_2xx + result.socket_errors
    error = None
    if result.requests == 0:
        ctx.record(spec.name, c.name, rnd, {}, raw, error="wrk: no response")
        return
    if failures > 0.01 * result.requests:
        # Counted out of the rate already (good responses only); said loudly too.
        error = f"{failures} failed requests of {result.requests}: {result.errors}"
    ctx.record(
        spec.name, c.name, rnd, spec.metrics(result, cpu if pids else None), raw, error=error
    )


def http_keepalive(ctx: Context) -> None:
    wrk_case(ctx, WRK_CASES["http_keepalive"])


def https_keepalive(ctx: Context) -> None:
    wrk_case(ctx, WRK_CASES["https_keepalive"])


def tls_handshakes(ctx: Context) -> None:
    wrk_case(ctx, WRK_CASES["tls_handshakes"])


# http_idle_memory: (kind, the contestant's listener, metric names by RSS and PSS)
HTTP_IDLE_KINDS = (
    ("http", "http", "kb_per_http_conn", "pss_kb_per_http_conn"),
    ("ws", "ws", "kb_per_ws", "pss_kb_per_ws"),
)


def http_idle_memory(ctx: Context) -> None:
    """Memory per idle keep-alive client connection (one request made) and per idle
    websocket (upgraded, one message echoed), each on a freshly started proxy."""
    upstream = start_http_upstream(ctx, "http_idle_memory")
    wsecho = start_wsecho(ctx, "http_idle_memory")
    try:
        for rnd in range(ctx.rounds):
            for kind, listener, rss_metric, pss_metric in HTTP_IDLE_KINDS:
                for c in ctx.contestants:
                    if c.name == "direct":
                        continue  # no proxy process to weigh
                    if listener not in c.ports:
                        if rnd == 0:
                            _has_listener(ctx, "http_idle_memory", c, listener)
                        continue
                    _one_http_idle(ctx, c, rnd, kind, listener, rss_metric, pss_metric)
                    _settle(1.0)
    finally:
        ctx.group.stop(wsecho)
        ctx.group.stop(upstream)


def _one_http_idle(
    ctx: Context,
    c: Contestant,
    rnd: int,
    kind: str,
    listener: str,
    rss_metric: str,
    pss_metric: str,
) -> None:
    case = "http_idle_memory"
    # A fresh proxy per measurement, also between the two kinds: memory freed by the
    # first kind's connections and kept by the allocator would hide the second's cost.
    c.stop(ctx.group)
    c.start(ctx.group, ctx.ports, ctx.workdir, ctx.cpus("proxy", case))
    port = c.port(listener)
    extra = ("--mode", kind)
    time.sleep(0.5)
    pids = c.pids()
    start = memory_kb(pids)
    # Warm-up: the first connections pay one-off costs (lazy imports, pools, the
    # upstream keep-alive pool); charged to the baseline, not to the N.
    holder, _ = _hold(ctx, port, 100, case, "bench.httphold", extra)
    _release(ctx, holder)
    time.sleep(0.5)
    idle = memory_kb(pids)
    raw: dict[str, Any] = {"kind": kind, "mem_start": start, "mem_idle": idle}
    holder, opened = _hold(ctx, port, ctx.idle_connections, case, "bench.httphold", extra)
    try:
        time.sleep(1.0)  # let the proxy finish whatever it does after the last response
        pids = c.pids()
        with_conns = memory_kb(pids)
        raw.update(mem_with=with_conns, hold=opened)
    finally:
        done = _release(ctx, holder)
    time.sleep(0.5)
    raw.update(mem_after_close=memory_kb(c.pids()), release=done)
    n = opened["open"]
    metrics: dict[str, float] = {}
    errors = []
    if n:
        metrics[rss_metric] = (with_conns["rss_kb"] - idle["rss_kb"]) / n
        metrics[pss_metric] = (with_conns["pss_kb"] - idle["pss_kb"]) / n
    if n < ctx.idle_connections:
        errors.append(
            f"only {n} of {ctx.idle_connections} {kind} connections opened "
            f"({opened['failed']} failed: {opened.get('errors')})"
        )
    still = done.get("still_open")
    if still is not None and still < n:
        # Weighed while some were already closed: the per-connection figure is wrong.
        errors.append(f"the proxy closed {n - still} of {n} idle {kind} connections while held")
        metrics = {}
    ctx.record(case, c.name, rnd, metrics, raw, error="; ".join(errors) or None)


# --- script cases: bench/jail_lines.py, bench/ban_latency.py, bench/observe_cost.py ------


def script_available(name: str) -> bool:
    return (BENCH_DIR / f"{name}.py").exists()


def run_script_case(ctx: Context, name: str, script: Path | None = None) -> None:
    """Run bench/<name>.py once per round. Such a script measures edgeward against
    its own reference (fail2ban-regex, ...) and prints one JSON line at the end;
    every number in it becomes a metric (nested keys joined with dots)."""
    script = script or BENCH_DIR / f"{name}.py"
    options = (
        SCRIPT_ARGS[name](script.read_text(errors="replace"), ctx.quick)
        if (name in SCRIPT_ARGS)
        else []
    )
    argv = [python(), str(script), *options]
    for rnd in range(ctx.rounds):
        try:
            out = _run_pinned(argv, None, timeout=300 if ctx.quick else 900, env=bench_env())
        except subprocess.TimeoutExpired as e:
            ctx.record(name, name, rnd, {}, {"argv": argv}, error=str(e))
            continue
        result = _last_json_line(out.stdout)
        if result is None:
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            ctx.record(
                name,
                name,
                rnd,
                {},
                {"argv": argv},
                error=f"exit {out.returncode}, no JSON line: {' | '.join(tail)}",
            )
            continue
        metrics = {
            k: float(v)
            for k, v in _flatten(result).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        ctx.record(name, name, rnd, metrics, {"argv": argv, "result": result})


def jail_lines(ctx: Context) -> None:
    run_script_case(ctx, "jail_lines")


def ban_latency(ctx: Context) -> None:
    run_script_case(ctx, "ban_latency")


def shared_ban_latency(ctx: Context) -> None:
    run_script_case(ctx, "shared_ban_latency")


def kernel_path(ctx: Context) -> None:
    run_script_case(ctx, "kernel_path")


def scenario_rss(ctx: Context) -> None:
    run_script_case(ctx, "scenario_rss")


def scenario_rss_args(source: str, quick: bool) -> list[str]:
    """bench/scenario_rss.py takes its own median; one start per bench round."""
    return ["--rounds", "1"]


def kernel_path_args(source: str, quick: bool) -> list[str]:
    """bench/kernel_path.py runs 9 iperf3 tests of --seconds each (default 5)."""
    return ["--seconds", "2"] if quick and "--seconds" in source else []


def observe_cost(ctx: Context) -> None:
    run_script_case(ctx, "observe_cost")


def observe_cost_args(source: str, quick: bool) -> list[str]:
    """One round of 2 s per mode when quick; its own 3 rounds of 5 s otherwise."""
    return ["--quick"] if quick and "--quick" in source else []


def handoff(ctx: Context) -> None:
    run_script_case(ctx, "handoff")


def handoff_args(source: str, quick: bool) -> list[str]:
    """bench/handoff.py runs its own rounds (medians); one of them per bench round."""
    return ["--quick"] if quick else ["--rounds", "1"]


def transparent(ctx: Context) -> None:
    run_script_case(ctx, "transparent")


def workers(ctx: Context) -> None:
    run_script_case(ctx, "workers")


def ban_latency_args(source: str, quick: bool) -> list[str]:
    """Its --rounds is how many addresses it bans (default 200); 50 give a usable
    p50/p90 in a quick run."""
    return ["--rounds", "50"] if quick and "--rounds" in source else []


def jail_lines_args(source: str, quick: bool) -> list[str]:
    """Options for bench/jail_lines.py, passed only if its source offers them (it is
    written separately and may change).

    Its default (a million lines, every pre-screening strategy) takes ~5 minutes per
    round on 2 CPUs; lines/s needs far fewer lines, and the strategy comparison is the
    script's own tuning tool, not part of this side-by-side table.
    """
    args: list[str] = []
    if "--lines" in source:
        args += ["--lines", "200000" if quick else "500000"]
    if "--strategies" in source:
        args += ["--strategies="]
    if quick and "--quick" in source:
        args.append("--quick")
    return args


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                return doc
    return None


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


SCRIPT_ARGS: dict[str, Callable[[str, bool], list[str]]] = {
    "jail_lines": jail_lines_args,
    "ban_latency": ban_latency_args,
    "shared_ban_latency": ban_latency_args,  # the same --rounds: addresses banned
    "kernel_path": kernel_path_args,
    "observe_cost": observe_cost_args,
    "handoff": handoff_args,
    "transparent": handoff_args,  # the same: its own rounds, one per bench round
    "workers": handoff_args,  # the same
    "scenario_rss": scenario_rss_args,
}

CASES: dict[str, Callable[[Context], None]] = {
    "tcp_bulk": tcp_bulk,
    "conn_rate": conn_rate,
    "idle_memory": idle_memory,
    "udp": udp,
    "jail_lines": jail_lines,
    "ban_latency": ban_latency,
    "shared_ban_latency": shared_ban_latency,
    "kernel_path": kernel_path,
    "scenario_rss": scenario_rss,
    "observe_cost": observe_cost,
    "http_keepalive": http_keepalive,
    "https_keepalive": https_keepalive,
    "tls_handshakes": tls_handshakes,
    "http_idle_memory": http_idle_memory,
    "handoff": handoff,
    "transparent": transparent,
    "workers": workers,
}
