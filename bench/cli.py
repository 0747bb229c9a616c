"""`python -m bench`: run the cases for every contestant and write the results."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import cases as case_mod
from bench import ctools
from bench.contestants import Contestant, all_contestants, port_names
from bench.envinfo import environment
from bench.procs import ProcessGroup, raise_nofile_limit
from bench.report import absolute_chart, chart, markdown, summarize_results
from bench.templating import allocate_ports

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_CASES = (
    "tcp_bulk",
    "conn_rate",
    "idle_memory",
    "scenario_rss",
    "udp",
    "http_keepalive",
    "https_keepalive",
    "tls_handshakes",
    "http_idle_memory",
    "jail_lines",
    "ban_latency",
    "shared_ban_latency",
    "kernel_path",
    "observe_cost",
    "handoff",
    "transparent",
    "workers",
)
# The cases that need wrk (Debian's `wrk`, installed by `make peers`).
WRK_CASES = frozenset({"http_keepalive", "https_keepalive", "tls_handshakes"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="edgeward side by side with a direct connection, HAProxy and nginx.",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="one round, short runs (about 6 minutes): for development",
    )
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3, 1 with --quick)")
    ap.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"comma-separated subset of {','.join(DEFAULT_CASES)}",
    )
    ap.add_argument(
        "--contestants",
        default="direct,haproxy,nginx,edgeward",
        help="comma-separated subset (order is the interleaving order)",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    ap.add_argument("--idle-connections", type=int, default=9000)
    ap.add_argument(
        "--pin",
        choices=("auto", "all", "off"),
        default="auto",
        help="auto (on >= 2 CPUs): in conn_rate, idle_memory and the HTTP cases the clients run "
        "on the last CPU, proxies and upstream servers on the others; tcp_bulk and udp unpinned. "
        "all: pin every case. off: the scheduler places everything",
    )
    ap.add_argument(
        "--tools",
        choices=("auto", "python"),
        default="auto",
        help="auto: build the C echo server and short-connection client from bench/tools/ "
        "when a C compiler exists; python: use the Python ones",
    )
    ap.add_argument(
        "--report",
        type=Path,
        metavar="RESULTS.json",
        help="run nothing: re-render latest.md and the chart from a results file",
    )
    ap.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep rendered configs and logs (printed path) for debugging",
    )
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    args.case_list = [c for c in args.cases.split(",") if c]
    unknown = set(args.case_list) - set(case_mod.CASES)
    if unknown:
        ap.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    args.contestant_list = [c for c in args.contestants.split(",") if c]
    return args


# Cases pinned by `--pin auto`. tcp_bulk (and udp, both iperf3) is not: pinning the two iperf3 ends to
# different CPUs halves the direct single-stream rate on small VMs, which would
# flatter every proxy's ratio to direct; in the short-connection, idle and HTTP
# cases (wrk is a request/response client like connrate) the client must get the
# same CPU for every contestant.
AUTO_PINNED = frozenset(
    {
        "conn_rate",
        "idle_memory",
        "http_keepalive",
        "https_keepalive",
        "tls_handshakes",
        "http_idle_memory",
    }
)


def cpu_plan(pin: str) -> tuple[set[int] | None, set[int] | None, frozenset[str], str]:
    """(client CPUs, proxy+upstream CPUs, pinned cases, description)."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "off" or len(cpus) < 2:
        return None, None, frozenset(), "off (the scheduler places every process)"
    client = {cpus[-1]}
    rest = set(cpus[:-1])
    cases = AUTO_PINNED if pin == "auto" else frozenset(case_mod.CASES)
    return (
        client,
        rest,
        cases,
        (
            f"in {', '.join(sorted(cases))}: clients on CPU {cpus[-1]}, proxies and upstream "
            f"servers on CPU(s) {','.join(map(str, sorted(rest)))}; other cases unpinned"
        ),
    )


def select_contestants(names: list[str], log: Any) -> tuple[list[Contestant], list[str]]:
    known = {c.name: c for c in all_contestants()}
    chosen: list[Contestant] = []
    notes: list[str] = []
    for name in names:
        c = known.get(name)
        if c is None:
            raise SystemExit(f"unknown contestant {name!r}; known: {', '.join(known)}")
        why = c.available()
        if why:
            notes.append(f"{name} skipped: {why}")
            log(f"! {name} skipped: {why}")
            continue
        chosen.append(c)
    return chosen, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        old: dict[str, Any] = json.loads(args.report.read_text())
        summarize_results(old)
        when = datetime.strptime(old["meta"]["started"], "%Y-%m-%d %H:%M:%SZ")
        write_outputs(old, args.out, when.replace(tzinfo=UTC), print, write_json=False)
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    # Ctrl-C and SIGTERM both unwind through the finally blocks that stop processes.
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # A shell without job control starts background jobs with SIGINT ignored; a
    # benchmark should still stop cleanly on `kill -INT`.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    soft, _hard = raise_nofile_limit()
    started = datetime.now(UTC)
    t0 = time.monotonic()
    contestants, notes = select_contestants(args.contestant_list, log)
    for script in case_mod.SCRIPT_ARGS:
        # Written separately; a case whose script is not there yet is skipped, not failed.
        if script in args.case_list and not case_mod.script_available(script):
            args.case_list.remove(script)
            notes.append(f"{script} skipped: bench/{script}.py does not exist yet")
    for name in ("tcp_bulk", "udp"):
        if name in args.case_list and shutil.which("iperf3") is None:
            args.case_list.remove(name)
            notes.append(f"{name} skipped: iperf3 not installed (make peers)")
    for name in sorted(WRK_CASES):
        if name in args.case_list and shutil.which("wrk") is None:
            args.case_list.remove(name)
            notes.append(f"{name} skipped: wrk not installed (make peers)")
    load1 = os.getloadavg()[0]
    if load1 > 0.75 * (os.cpu_count() or 1):
        # Other work on a small shared machine moves wall-clock rates more than the
        # proxies' own CPU accounting.
        notes.append(
            f"1-min load average {load1:.1f} on {os.cpu_count()} CPUs before the run (other "
            "work, or a previous run still decaying): rates may be noisier than usual; the "
            "CPU rows are the steadier comparison"
        )
    # A relayed connection (or websocket) holds two descriptors in the proxy.
    needed = 2 * args.idle_connections + 200
    for name in ("idle_memory", "http_idle_memory"):
        if name in args.case_list and soft < needed:
            notes.append(f"open-files limit {soft} < {needed}: {name} may fail")
    workdir = Path(tempfile.mkdtemp(prefix="edgeward-bench-"))
    try:
        return _run(args, argv, workdir, started, t0, contestants, notes, soft, log)
    finally:
        # Everything the run rendered, built and logged lives here; keep it only on request.
        if args.keep_workdir:
            log(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    argv: list[str] | None,
    workdir: Path,
    started: datetime,
    t0: float,
    contestants: list[Contestant],
    notes: list[str],
    soft: int,
    log: Any,
) -> int:
    client_cpus, proxy_cpus, pinned_cases, pinning = cpu_plan(args.pin)
    ports = allocate_ports(port_names())
    tools: dict[str, Path] = {}
    if args.tools == "auto":
        tools, why = ctools.build(workdir / "tools")
        if why:
            notes.append(why)
    log(
        f"bench: {len(contestants)} contestants, cases {','.join(args.case_list)}, "
        f"{args.rounds} round(s); workdir {workdir}; pinning: {pinning}"
    )
    doc: dict[str, Any] = {
        "meta": {
            "started": started.strftime("%Y-%m-%d %H:%M:%SZ"),
            "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "rounds": args.rounds,
            "idle_connections": args.idle_connections,
            "quick": args.quick,
            "contestants": [c.name for c in contestants],
            "ports": ports,
            "pinning": pinning,
            "load_tools": "C (bench/tools/)"
            if tools
            else "Python (bench/echo.py, bench/connrate.py)",
            "notes": notes,
            "environment": environment(contestants),
        },
        "cases": {},
    }
    ctx = case_mod.Context(
        group=ProcessGroup(workdir),
        contestants=contestants,
        ports=ports,
        workdir=workdir,
        rounds=args.rounds,
        quick=args.quick,
        client_cpus=client_cpus,
        upstream_cpus=proxy_cpus,
        proxy_cpus=proxy_cpus,
        pinned_cases=pinned_cases,
        idle_connections=args.idle_connections,
        log=log,
        tools=tools,
    )
    interrupted = False
    try:
        with ctx.group:
            for c in list(contestants):
                try:
                    # Placed per case by ctx.place_proxies().
                    c.start(ctx.group, ports, workdir)
                except (RuntimeError, TimeoutError, OSError) as e:
                    # One peer that cannot start must not cost the others their numbers.
                    contestants.remove(c)
                    notes.append(f"{c.name} did not start: {str(e).splitlines()[0]}")
                    log(f"! {c.name} did not start: {e}")
            for name in args.case_list:
                log(f"case {name}")
                case_t0 = time.monotonic()
                try:
                    case_mod.CASES[name](ctx)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # one broken case must not lose the others' results
                    notes.append(f"case {name} aborted: {type(e).__name__}: {e}")
                    log(f"! case {name} aborted: {e}")
                doc["cases"][name] = {
                    "runs": ctx.runs.get(name, []),
                    "seconds": time.monotonic() - case_t0,
                }
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted: partial results")
        log("interrupted: stopping every process and writing partial results")
        for name in args.case_list:
            if name in ctx.runs and name not in doc["cases"]:
                doc["cases"][name] = {"runs": ctx.runs[name], "seconds": None}
    doc["meta"]["contestants"] = [c.name for c in contestants]
    doc["meta"]["seconds"] = time.monotonic() - t0
    summarize_results(doc)
    write_outputs(doc, args.out, started, log)
    return 130 if interrupted else 0


def write_outputs(
    doc: dict[str, Any], out: Path, started: datetime, log: Any, write_json: bool = True
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    json_path = out / f"{stamp}.json"
    try:
        shown = json_path.resolve().relative_to(case_mod.REPO_DIR)
    except ValueError:
        shown = json_path
    doc["meta"].setdefault("results_file", str(shown))
    if write_json:
        # Written whole then renamed: an interrupted write never leaves a torn file.
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        tmp.replace(json_path)
    png = chart(doc, out / f"{stamp}-ratios.png")
    if png is None:
        doc["meta"].setdefault("notes", []).append(
            "no chart: matplotlib missing (pip install -e '.[bench]') or no edgeward ratios"
        )
    md = markdown(doc)
    (out / "latest.md").write_text(md)
    if png is not None:
        shutil.copyfile(png, out / "latest-ratios.png")
    absolute = absolute_chart(doc, out / f"{stamp}-absolute.png")
    if absolute is not None:
        shutil.copyfile(absolute, out / "latest-absolute.png")
    log("")
    log(md)
    log(
        ("wrote " + (f"{json_path}, " if write_json else "") + f"{out / 'latest.md'}")
        + "".join(f", {p}" for p in (png, absolute) if p is not None)
    )
    log(f"total {doc['meta']['seconds']:.0f}s")
