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
from bench.report import chart, markdown, summarize_results
from bench.templating import allocate_ports

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_CASES = ("tcp_bulk", "conn_rate", "idle_memory", "jail_lines")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="edgeward side by side with a direct connection, HAProxy and nginx.",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="one round, short runs (under 3 minutes): for development",
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
        choices=("auto", "off"),
        default="auto",
        help="auto: on >= 2 CPUs, clients on the last CPU, proxies and upstream "
        "servers on the others; off: let the scheduler place everything",
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


def cpu_plan(pin: str) -> tuple[set[int] | None, set[int] | None, str]:
    """(client CPUs, proxy+upstream CPUs, description).

    Pinning the load generator to its own CPU keeps it from fighting the proxy
    for the same core differently from one contestant to the next; it is the
    same CPU for every contestant.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "off" or len(cpus) < 2:
        return None, None, "off (scheduler places every process)"
    client = {cpus[-1]}
    rest = set(cpus[:-1])
    return (
        client,
        rest,
        (
            f"load generators (iperf3 client, short-connection and idle clients) "
            f"on CPU {cpus[-1]}; proxies and upstream servers on CPU(s) "
            f"{','.join(map(str, sorted(rest)))}"
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
        doc = json.loads(args.report.read_text())
        summarize_results(doc)
        started = datetime.strptime(doc["meta"]["started"], "%Y-%m-%d %H:%M:%SZ")
        write_outputs(doc, args.out, started.replace(tzinfo=UTC), print, write_json=False)
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
    if "jail_lines" in args.case_list and not case_mod.jail_lines_available():
        args.case_list.remove("jail_lines")
        if "jail_lines" in args.cases.split(","):
            notes.append("jail_lines skipped: bench/jail_lines.py does not exist yet")
    if "tcp_bulk" in args.case_list and shutil.which("iperf3") is None:
        args.case_list.remove("tcp_bulk")
        notes.append("tcp_bulk skipped: iperf3 not installed (make peers)")
    client_cpus, proxy_cpus, pinning = cpu_plan(args.pin)
    needed = 2 * args.idle_connections + 200
    if "idle_memory" in args.case_list and soft < needed:
        notes.append(f"open-files limit {soft} < {needed}: idle_memory may fail")
    workdir = Path(tempfile.mkdtemp(prefix="edgeward-bench-"))
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
        idle_connections=args.idle_connections,
        log=log,
        tools=tools,
    )
    interrupted = False
    try:
        with ctx.group:
            for c in list(contestants):
                try:
                    c.start(ctx.group, ports, workdir, proxy_cpus)
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
    finally:
        if args.keep_workdir:
            log(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
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
    if write_json:
        # Written whole then renamed: an interrupted write never leaves a torn file.
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        tmp.replace(json_path)
    md = markdown(doc)
    (out / "latest.md").write_text(md)
    png = chart(doc, out / f"{stamp}-ratios.png")
    if png is not None:
        shutil.copyfile(png, out / "latest-ratios.png")
    log("")
    log(md)
    log(
        ("wrote " + (f"{json_path}, " if write_json else "") + f"{out / 'latest.md'}")
        + (f", {png}" if png else " (no chart: no edgeward ratios or no matplotlib)")
    )
    log(f"total {doc['meta']['seconds']:.0f}s")
