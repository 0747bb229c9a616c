"""The reliability cases, sized by their caller: full size in tests/soak (`make soak`), small in CI.

Each case starts its own edge (support.EdgeProcess) and upstreams on loopback,
drives load from separate processes where the load is heavy (C tools built here
with the system compiler, or a Python client process), observes the edge from
outside (/proc/PID, the admin API), stops every process it started by PID, and
returns a Report: its figures and each goal with PASS/FAIL. Every loop is bounded
in count and time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from badinput import HELLO, TRUSTED, classes
from harness import (
    counters,
    cpu_ns,
    diff,
    drive,
    open_fds,
    percentile,
    raise_nofile,
    rss_kib,
)

from support import ROOT, EdgeProcess, fds_besides_pipe_pool, free_port, settles_to

HERE = Path(__file__).resolve().parent
TOOLS = {"holdload": HERE / "tools" / "holdload.c", "tcpecho": ROOT / "bench" / "tools" / "tcpecho.c"}


@dataclass
class Report:
    name: str
    figures: dict[str, object] = field(default_factory=dict)
    goals: list[tuple[str, bool]] = field(default_factory=list)

    def goal(self, text: str, ok: bool) -> bool:
        self.goals.append((text, bool(ok)))
        return bool(ok)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.goals)

    def render(self) -> str:
        lines = [f"== {self.name}: {'PASS' if self.passed else 'FAIL'}"]
        lines += [f"   {k}: {v}" for k, v in self.figures.items()]
        lines += [f"   [{'PASS' if ok else 'FAIL'}] {text}" for text, ok in self.goals]
        return "\n".join(lines)

    def emit(self) -> None:
        print("\n" + self.render(), flush=True)
        out = os.environ.get("EDGEWARD_SOAK_RESULTS")
        if out:
            with open(out, "a") as f:
                f.write(json.dumps({"case": self.name, "passed": self.passed, "figures": self.figures,
                                    "goals": self.goals}, default=str) + "\n")


# ---------------------------------------------------------------------- processes
def build_tool(name: str, out_dir: Path) -> Path:
    exe = out_dir / name
    if not exe.exists():
        cc = next((c for c in ("cc", "gcc", "clang") if _which(c)), None)
        if cc is None:
            raise RuntimeError("no C compiler (scripts/install-peers.sh installs gcc)")
        subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(TOOLS[name])], check=True, timeout=120)
    return exe


def _which(cmd: str) -> str | None:
    import shutil
    return shutil.which(cmd)


@contextlib.contextmanager
def started(argv: list[str], ready: str | None = None, **kw: object) -> Iterator[subprocess.Popen[str]]:
    """A child process, stopped by its PID on the way out (SIGTERM, then SIGKILL)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **kw)  # type: ignore[call-overload]
    try:
        if ready is not None:
            assert p.stdout is not None
            line = p.stdout.readline()
            if ready not in line:
                raise RuntimeError(f"{argv[0]} did not start: {line!r}")
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def echo_upstream(tools: Path) -> tuple[contextlib.AbstractContextManager[subprocess.Popen[str]], int]:
    port = free_port()
    return started([str(build_tool("tcpecho", tools)), str(port), "127.0.0.1"], ready="READY"), port


def edge_config(tmp: Path, admin: int, body: str, *, per_client: int = 0) -> str:
    return f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp / 'state'}"
max_connections_per_client = {per_client}
{body}"""


class Sampler:
    """Samples the edge's RSS and open descriptors once a second on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss: list[int] = []
        self.fds: list[int] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(OSError):
                self.rss.append(rss_kib(self.pid))
                self.fds.append(open_fds(self.pid))

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(3)


# ---------------------------------------------------------------------- concurrency
def concurrency(tmp: Path, *, hold: int, hold_s: float, every: float, churn: float) -> Report:
    """`hold` relayed connections held `hold_s` seconds with an echo every `every` seconds each,
    plus `churn` new short connections a second throughout."""
    rep = Report(f"concurrency: {hold:,} held {hold_s:g}s + {churn:g} new/s")
    raise_nofile()
    tools = tmp / "tools"
    tools.mkdir(exist_ok=True)
    hello = tmp / "hello.bin"
    hello.write_bytes(HELLO)
    up_ctx, up_port = echo_upstream(tools)
    port, admin = free_port(), free_port()
    with up_ctx:
        e = EdgeProcess(tmp, edge_config(tmp, admin, f"""
[listeners.tls]
bind = ["127.0.0.1:{port}"]
[services.a]
listen = ["tls"]
names = ["a.example.org"]
to = "127.0.0.1:{up_port}"
"""), admin_port=admin, wait=[("127.0.0.1", port)])
        try:
            base_fds = fds_besides_pipe_pool(e)
            rss0 = rss_kib(e.pid)
            cpu0 = cpu_ns(e.pid)
            argv = [str(build_tool("holdload", tools)), "127.0.0.1", str(port), str(hold), str(hold_s), str(every),
                    str(churn), str(hold_s + 10), str(hello)]
            with started(argv) as load:
                assert load.stdout is not None
                line = load.stdout.readline()  # "HELD n seconds"
                ramp = line.split()
                held_rss, held_fds = rss_kib(e.pid), open_fds(e.pid)
                with Sampler(e.pid) as s:
                    time.sleep(hold_s / 2)
                    conns_during = e.status()["connections"]
                    rest = load.communicate(timeout=hold_s + 240)[0]
            result = json.loads(rest.strip().splitlines()[-1])
            cpu = (cpu_ns(e.pid) - cpu0) / 1e9
            after = settles_to(e, base_fds, timeout=15)
            # Memory back after the burst: the edge collects and trims once the live count falls
            # under half of its peak (edge.MemoryReturn, within a sweep and its 10 s cooldown).
            # Bound: 10 MiB (issue 11's figure) or two thirds of what the burst added, whichever is
            # larger: what stays is heap fragmentation (objects that lived through the burst pin
            # pymalloc's arenas), not connections. A burst of >= 1,000 must have been collected.
            burst = max(0, held_rss - rss0)
            rss_bound = rss0 + max(10 * 1024, burst * 2 // 3)
            rss_back = _rss_settles(e.pid, rss_bound, timeout=15)
            collections = e.status()["memory"]["after_burst_collections"]  # type: ignore[index]
            hold_rss = s.rss[: max(1, int(hold_s))] or [held_rss]
            errors = sum(result[k] for k in ("connect_errors", "resets", "early_closes", "mismatches", "timeouts"))
            rep.figures.update({
                "held": result["held"], "ramp_seconds": float(ramp[2]) if len(ramp) > 2 else None,
                "echoes_ok": result["pings_ok"], "churn_ok": f"{result['churn_ok']}/{result['churn_started']}",
                "errors": {k: result[k] for k in ("connect_errors", "resets", "early_closes", "mismatches",
                                                  "timeouts")},
                "worst_echo_ms": result["worst_ping_ms"], "worst_hello_ms": result["worst_hello_ms"],
                "rss_kib": {"idle": rss0, "held": held_rss, "hold_min": min(hold_rss), "hold_max": max(hold_rss),
                            "after_close": rss_back},
                "edge_fds": {"baseline": base_fds, "held": held_fds, "after": after},
                "edge_cpu_s": round(cpu, 1), "edge_connections_mid_hold": conns_during,
            })
            growth = max(hold_rss) - hold_rss[0]
            rep.figures["rss_growth_during_hold_kib"] = growth
            rep.goal(f"{hold:,} connections held for the whole hold", result["held"] == hold
                     and result["held_at_end"] == hold and conns_during >= hold)
            rep.goal("0 errors (connect, reset, early close, wrong bytes, timeout)", errors == 0)
            rep.goal("every churn connection served", result["churn_ok"] == result["churn_started"] > 0)
            rep.goal("RSS flat during the hold (growth <= 5% or 2 MiB)", growth <= max(2048, 0.05 * hold_rss[0]))
            rep.goal("descriptors back to baseline after", after == base_fds)
            rep.figures["after_burst_collections"] = collections
            rep.goal(f"RSS gives the burst back after they close ({rss_back - rss0:+,} KiB of {burst:+,}; "
                     f"bound: 10 MiB or two thirds)", rss_back <= rss_bound and (hold < 2000 or collections >= 1))
            rep.goal("edge alive", e.proc.poll() is None)
        finally:
            e.stop()
    rep.emit()
    return rep


def _rss_settles(pid: int, at_most: int, timeout: float) -> int:
    """Poll the RSS until it is at most `at_most` KiB (or time runs out); returns the last."""
    deadline = time.monotonic() + timeout
    rss = rss_kib(pid)
    while rss > at_most and time.monotonic() < deadline:
        time.sleep(0.2)
        rss = rss_kib(pid)
    return rss


# ---------------------------------------------------------------------- slowloris
SLOW_CLIENTS = HERE / "slowclients.py"


def _legit_rtts(port: int, n: int, spacing: float = 0.0) -> list[float]:
    out = []
    for _ in range(n):
        if spacing:
            time.sleep(spacing)
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sendall(HELLO)
            got = 0
            while got < len(HELLO):
                d = c.recv(65536)
                if not d:
                    raise ConnectionError("closed before the echo")
                got += len(d)
        out.append(time.perf_counter() - t0)
    return out


def slowloris(tmp: Path, *, slow: int, rtts: int, sniff_timeout: float) -> Report:
    """`slow` clients trickle a hello one byte a second on a sniffing listener while a legit client
    measures `rtts` round trips (connect, hello routed by SNI, echo)."""
    rep = Report(f"slowloris: {slow:,} trickling clients, sniff_timeout {sniff_timeout:g}s")
    raise_nofile()
    tools = tmp / "tools"
    tools.mkdir(exist_ok=True)
    up_ctx, up_port = echo_upstream(tools)
    port, admin = free_port(), free_port()
    with up_ctx:
        e = EdgeProcess(tmp, edge_config(tmp, admin, f"""
[listeners.tls]
bind = ["127.0.0.1:{port}"]
sniff_timeout = "{sniff_timeout}s"
[services.a]
listen = ["tls"]
names = ["a.example.org"]
to = "127.0.0.1:{up_port}"
"""), admin_port=admin, wait=[("127.0.0.1", port)])
        try:
            base_fds = fds_besides_pipe_pool(e)
            _legit_rtts(port, 20)  # warm up
            # Spread over most of a slow client's life: their bytes arrive in bursts once a second.
            spacing = max(0.0, (sniff_timeout - 1.5) / rtts)
            baseline = _legit_rtts(port, rtts, spacing)
            before = counters(e.status(), "refused")
            argv = [sys.executable, str(SLOW_CLIENTS), str(port), str(slow), str(sniff_timeout)]
            with started(argv, ready="STARTED", env=dict(os.environ, PYTHONPATH=f"{HERE}:{ROOT / 'src'}")) as sc:
                deadline = time.monotonic() + 10
                while e.status()["connections"] < slow * 0.95 and time.monotonic() < deadline:
                    time.sleep(0.05)
                present = e.status()["connections"]
                t0 = time.monotonic()
                during = _legit_rtts(port, rtts, spacing)
                measured_in = time.monotonic() - t0
                out = sc.communicate(timeout=sniff_timeout + 60)[0]
            res = json.loads(out.strip().splitlines()[-1])
            reasons = diff(counters(e.status(), "refused"), before)
            after = settles_to(e, base_fds, timeout=10)
            p99_base, p99_during = percentile(baseline, 99), percentile(during, 99)
            rep.figures.update({
                "slow_clients_present_while_measuring": present,
                "legit_rtt_ms_baseline": {"p50": round(percentile(baseline, 50) * 1e3, 2),
                                          "p99": round(p99_base * 1e3, 2)},
                "legit_rtt_ms_during": {"p50": round(percentile(during, 50) * 1e3, 2),
                                        "p99": round(p99_during * 1e3, 2)},
                "legit_measured_in_s": round(measured_in, 2),
                "slow_client_lifetime_s": res["lifetime"], "slow_clients_cut": res["closed_by_edge"],
                "refusals": {k[-1]: v for k, v in reasons.items()},
            })
            rep.goal(f"slow clients all present while the legit client measures ({present:,})", present >= slow * 0.95)
            rep.goal("every slow client cut by the edge", res["closed_by_edge"] == slow)
            lo, hi = res["lifetime"]["min"], res["lifetime"]["max"]
            rep.goal(f"... at the sniff timeout ({lo:.2f}-{hi:.2f}s for {sniff_timeout:g}s)",
                     sniff_timeout - 0.1 <= lo and hi <= sniff_timeout + 1.5)
            rep.goal("counted as sniff_timeout", reasons.get(("tls", "sniff_timeout"), 0) == slow)
            # A p99 of a few dozen samples is close to their maximum: on a shared 2-core
            # machine one scheduler hiccup of a few ms moves it. The goal is "still served
            # promptly", so the bound is 2x baseline with a 10 ms floor for that noise.
            p99_bound = max(2 * p99_base, p99_base + 0.010)
            rep.goal(f"legit p99 within 2x of baseline, 10 ms floor ({p99_during * 1e3:.2f} ms vs "
                     f"{p99_base * 1e3:.2f} ms)", p99_during <= p99_bound)
            rep.goal("descriptors back to baseline after", after == base_fds)
        finally:
            e.stop()
    rep.emit()
    return rep


# ---------------------------------------------------------------------- bad-input storm
def storm(tmp: Path, *, total: int, seconds: float, sniff_timeout: float = 2.0) -> Report:
    """`total` connections of mixed bad input, paced over `seconds`."""
    rep = Report(f"bad-input storm: {total:,} connections in {seconds:g}s")
    raise_nofile()
    tools = tmp / "tools"
    tools.mkdir(exist_ok=True)
    up_ctx, up_port = echo_upstream(tools)
    port, admin = free_port(), free_port()
    with up_ctx:
        e = EdgeProcess(tmp, edge_config(tmp, admin, f"""
[listeners.tls]
bind = ["127.0.0.1:{port}"]
sniff_timeout = "{sniff_timeout}s"
trusted_proxies = ["{TRUSTED}/32"]
[services.a]
listen = ["tls"]
names = ["a.example.org"]
to = "127.0.0.1:{up_port}"
"""), admin_port=admin, wait=[("127.0.0.1", port)])
        try:
            rng = random.Random(20)
            makers = list(classes(sniff_timeout).values())
            # Warm-up: the first few hundred bad clients allocate what the edge keeps (caches, pools).
            drive(port, [rng.choice(makers)[0](rng) for _ in range(500)], deadline=sniff_timeout + 5,
                  concurrency=500)
            time.sleep(1)
            base_fds, rss0 = fds_besides_pipe_pool(e), rss_kib(e.pid)
            before = counters(e.status(), "refused")
            cpu0 = cpu_ns(e.pid)
            scripts = [rng.choice(makers)[0](rng) for _ in range(total)]
            t0 = time.monotonic()
            with Sampler(e.pid) as s:
                res = drive(port, scripts, deadline=sniff_timeout + 10, concurrency=3000, rate=total / seconds)
            took = time.monotonic() - t0
            cpu = (cpu_ns(e.pid) - cpu0) / 1e9
            time.sleep(1.5)
            reasons = diff(counters(e.status(), "refused"), before)
            after, rss1 = settles_to(e, base_fds, timeout=10), rss_kib(e.pid)
            rep.figures.update({
                "sent_in_s": round(took, 1), "closed_by_edge": res.closed_by_edge,
                "connect_errors": res.connect_errors, "still_open_at_deadline": res.timed_out,
                "refusals_by_reason": {k[-1]: v for k, v in sorted(reasons.items())},
                "refusals_total": sum(reasons.values()), "edge_cpu_s": round(cpu, 2),
                "edge_cpu_per_conn_us": round(cpu / total * 1e6, 1),
                "rss_kib": {"before": rss0, "peak": max(s.rss, default=rss0), "after": rss1},
                "edge_fds": {"before": base_fds, "peak": max(s.fds, default=0), "after": after},
            })
            rep.goal("no crash (edge alive, still serving)", e.proc.poll() is None and _served(port))
            rep.goal("every bad connection closed by the edge", res.closed_by_edge == total)
            rep.goal("every one refused and counted by reason", sum(reasons.values()) == total)
            rep.goal("descriptors back to baseline", after == base_fds)
            rep.goal("RSS back near baseline (within 10 MiB)", rss1 - rss0 <= 10 * 1024)
        finally:
            e.stop()
    rep.emit()
    return rep


def _served(port: int) -> bool:
    try:
        return len(_legit_rtts(port, 1)) == 1
    except OSError:
        return False


# ---------------------------------------------------------------------- reload under load
def reload_under_load(tmp: Path, *, reloads: int, rate: float, seconds: float) -> Report:
    """`reloads` reloads spread over `seconds` while `rate` new connections a second arrive, half on
    a plain listener, half on a TLS-sniffed one. Every other reload also adds/removes a listener."""
    rep = Report(f"reload under load: {reloads} reloads during {rate:g} new connections/s")
    raise_nofile()
    tools = tmp / "tools"
    tools.mkdir(exist_ok=True)
    hello, plain = tmp / "hello.bin", tmp / "plain.bin"
    hello.write_bytes(HELLO)
    plain.write_bytes(b"plain relayed bytes\n" * 10)
    up_ctx, up_port = echo_upstream(tools)
    tls_port, plain_port, extra_port, admin = free_port(), free_port(), free_port(), free_port()

    def config(i: int) -> str:
        extra = f"""
[services.extra]
listen = ["127.0.0.1:{extra_port}"]
to = "127.0.0.1:{up_port}"
""" if i % 2 else ""
        return edge_config(tmp, admin, f"""
[listeners.tls]
bind = ["127.0.0.1:{tls_port}"]
idle_timeout = "{3600 - i}s"
[services.a]
listen = ["tls"]
names = ["a.example.org"]
to = "127.0.0.1:{up_port}"
[services.plain]
listen = ["127.0.0.1:{plain_port}"]
to = "127.0.0.1:{up_port}"
{extra}""")

    with up_ctx:
        e = EdgeProcess(tmp, config(0), admin_port=admin, wait=[("127.0.0.1", tls_port), ("127.0.0.1", plain_port)])
        try:
            exe = str(build_tool("holdload", tools))
            applied = 0
            with started([exe, "127.0.0.1", str(tls_port), "0", "0", "1", str(rate / 2), str(seconds), str(hello)]) as a, \
                 started([exe, "127.0.0.1", str(plain_port), "0", "0", "1", str(rate / 2), str(seconds), str(plain)]) as b:
                time.sleep(seconds / (reloads + 1))
                for i in range(1, reloads + 1):
                    e.write_config(config(i))
                    code, body = e.api("POST", "/reload")
                    applied += code == 200 and isinstance(body, dict) and body.get("applied") is True
                    time.sleep(seconds / (reloads + 1))
                ra = json.loads(a.communicate(timeout=seconds + 120)[0].strip().splitlines()[-1])
                rb = json.loads(b.communicate(timeout=seconds + 120)[0].strip().splitlines()[-1])
            errs = {k: ra[k] + rb[k] for k in ("connect_errors", "resets", "early_closes", "mismatches", "timeouts")}
            rep.figures.update({
                "reloads_applied": f"{applied}/{reloads}", "reloads_counted": e.status()["reloads"],
                "tls_sniffed_ok": f"{ra['churn_ok']}/{ra['churn_started']}",
                "plain_ok": f"{rb['churn_ok']}/{rb['churn_started']}", "failed": errs,
                "worst_connect_to_echo_ms": max(ra["worst_hello_ms"], rb["worst_hello_ms"]),
            })
            rep.goal(f"{reloads} reloads applied", applied == reloads)
            rep.goal("0 failed connections", sum(errs.values()) == 0 and ra["churn_ok"] == ra["churn_started"] > 0
                     and rb["churn_ok"] == rb["churn_started"] > 0)
            rep.goal("edge alive", e.proc.poll() is None)
        finally:
            e.stop()
    rep.emit()
    return rep


# ---------------------------------------------------------------------- durability
def banned_addresses(n: int) -> list[str]:
    """n distinct loopback addresses (127.1.0.1 ...), so a test can connect from a banned one."""
    return [f"127.{1 + i // 65024}.{(i // 254) % 256}.{1 + i % 254}" for i in range(n)]


def durability(tmp: Path, *, bans: int, threads: int = 8) -> Report:
    """`bans` bans through the admin API, kill -9, restart: none lost, banned still refused."""
    rep = Report(f"durability: {bans:,} bans, kill -9, restart")
    tools = tmp / "tools"
    tools.mkdir(exist_ok=True)
    up_ctx, up_port = echo_upstream(tools)
    port, admin = free_port(), free_port()
    cfg = edge_config(tmp, admin, f"""
[services.s]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up_port}"
""", per_client=512)
    addrs = banned_addresses(bans)
    with up_ctx:
        e = EdgeProcess(tmp, cfg, admin_port=admin, wait=[("127.0.0.1", port)])
        try:
            def ban(a: str) -> int:
                return e.api("POST", "/ban", {"addr": a, "jail": "manual", "reason": "soak"})[0]
            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                codes = list(pool.map(ban, addrs))
            took = time.monotonic() - t0
            ok = sum(c == 200 for c in codes)
            _, listed = e.api("GET", "/bans")
            before_kill = len(listed) if isinstance(listed, list) else -1
            e.proc.kill()  # kill -9: no shutdown path runs
            e.proc.wait(10)
        finally:
            e.stop()
        first_banned, unbanned = addrs[-1], "127.0.0.1"
        e = EdgeProcess(tmp, cfg, admin_port=admin)
        try:
            # The very first connection the restarted edge accepts comes from a banned address.
            deadline = time.monotonic() + 15
            first: bool | None = None
            while first is None and time.monotonic() < deadline:
                first = _echoed_from(first_banned, port)
                if first is None:
                    time.sleep(0.01)
            _, listed = e.api("GET", "/bans")
            after = {b["address"] for b in listed} if isinstance(listed, list) else set()  # type: ignore[index]
            lost = [a for a in addrs if a not in after]
            other_banned = _echoed_from(addrs[0], port)
            served = _echoed_from(unbanned, port)
            rep.figures.update({
                "bans_accepted": f"{ok}/{bans}", "seconds": round(took, 2),
                "bans_per_s": round(bans / took), "api_threads": threads,
                "listed_before_kill": before_kill, "listed_after_restart": len(after), "lost": len(lost),
            })
            rep.goal(f"{bans:,} bans accepted", ok == bans and before_kill == bans)
            rep.goal("0 lost after kill -9 and restart", not lost and len(after) == bans)
            rep.goal("first connection after restart, from a banned address, refused", first is False)
            rep.goal("another banned address refused, an unbanned one served", other_banned is False and served is True)
        finally:
            e.stop()
    rep.emit()
    return rep


def _echoed_from(src: str, port: int) -> bool | None:
    """True: echoed; False: accepted then closed by the edge; None: not accepting yet."""
    c = socket.socket()
    try:
        c.bind((src, 0))
        c.settimeout(3)
        try:
            c.connect(("127.0.0.1", port))
        except (ConnectionRefusedError, TimeoutError):
            return None
        except ConnectionResetError:
            # The handshake completed and the edge reset the connection before connect()
            # returned: a banned client is closed with an RST right after accept.
            return False
        try:
            c.sendall(b"ping")
            return c.recv(4) == b"ping"
        except OSError:
            return False
    finally:
        c.close()
