"""Turning a results document into the README table and ratio charts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cases import METRICS, SCRIPT_ARGS
from bench.stats import Summary, ratio, ratios_of, summarize_runs

CONTESTANTS = ("direct", "haproxy", "nginx", "edgeward")
PEERS = ("direct", "haproxy", "nginx")
# Cases run by a separate script: their own tables, no contestant columns.
SCRIPT_CASES = frozenset(SCRIPT_ARGS)
HTTP_CASES = ("http_keepalive", "https_keepalive", "tls_handshakes", "http_idle_memory")
# Under the table when the udp case ran.
UDP_NOTE = (
    "UDP rows: `iperf3 -u -l 200` through each proxy (TCP control and UDP datagrams on one "
    "port), flat out (`-b 0`) and paced to 50,000 datagrams/s (`-b 80M`); datagrams "
    "received (per second of sending) and loss are the iperf3 server's own count (by "
    "sequence number), so a datagram lost "
    "anywhere (client socket, proxy, server socket) counts. HAProxy 2.6 does not proxy "
    "UDP: no haproxy numbers in the UDP rows."
)
# Under the table when an HTTP case ran.
HTTP_NOTE = (
    "HTTP rows: `wrk -t1 -c50 -d10s --latency` (`-d3s` with --quick) through each proxy to one "
    "nginx upstream answering a fixed 100-byte body (`direct`: wrk straight to that nginx, which "
    "terminates TLS itself for the HTTPS rows). Requests/s count 2xx/3xx responses only (wrk's "
    '"Non-2xx or 3xx" are left out); p50/p99 are '
    "wrk's latency percentiles. wrk keeps 50 requests in flight (closed loop), so each "
    "contestant runs at its own saturation and its p50 is about 50 / its rate. HTTPS: TLS 1.3 terminated at the proxy with an ECDSA P-256 "
    "certificate made for the run, plain HTTP to the upstream. New TLS connections: the same with "
    "`-H 'Connection: close'`, so every request opens a connection with a full handshake (wrk "
    "resumes no session); when the client's CPU caps the rate, proxies come close to `direct`, "
    "while the CPU row (the proxy's own time per new connection) has no such cap. Idle HTTP "
    "memory: keep-alive connections that each made one request; idle websockets: connections "
    "upgraded to a websocket echo server (the `websockets` library) behind the proxy, one "
    "message echoed on each."
)
# En dash for ranges in the table (an escape, so the source stays ASCII-unambiguous).
DASH = "\u2013"


@dataclass(frozen=True)
class Goal:
    """A target from the issues, checked against the medians of this run."""

    metric: str
    text: str
    versus: str | None  # peer for a ratio goal, None for an absolute edgeward value
    at_least: float | None = None
    at_most: float | None = None
    issue: int = 2
    # For a rate the rig may cap: the CPU metric whose ratio is shown beside it.
    cpu_metric: str | None = None

    def check(self, case: Mapping[str, Any]) -> tuple[float | None, bool | None]:
        if self.versus is None:
            s = case.get("summary", {}).get("edgeward", {}).get(self.metric)
            value = float(s["median"]) if s else None
        else:
            value = case.get("ratios", {}).get(self.metric, {}).get(f"edgeward/{self.versus}")
        if value is None:
            return None, None
        ok = (self.at_least is None or value >= self.at_least) and (
            self.at_most is None or value <= self.at_most
        )
        return value, ok


# The benchmark goals of issue 2 (TCP/UDP edge) and issue 8 (HTTP edge).
GOALS = (
    Goal("gbit_s_p1", "TCP bulk 1 stream >= 0.85 of direct", "direct", at_least=0.85),
    Goal("gbit_s_p8", "TCP bulk 8 streams >= 0.85 of direct", "direct", at_least=0.85),
    Goal("conn_per_s", "short connections/s >= 0.8 of HAProxy", "haproxy", at_least=0.8),
    Goal("kb_per_conn", "memory per idle relayed connection <= 3 KB", None, at_most=3.0),
    Goal(
        "http_req_per_s",
        "HTTP keep-alive requests/s >= 0.7 of HAProxy",
        "haproxy",
        at_least=0.7,
        issue=8,
        cpu_metric="cpu_s_per_1k_http_req",
    ),
    Goal("http_p99_ms", "HTTP keep-alive p99 <= 1.5x HAProxy's", "haproxy", at_most=1.5, issue=8),
    Goal(
        "https_req_per_s",
        "HTTPS keep-alive requests/s >= 0.7 of HAProxy",
        "haproxy",
        at_least=0.7,
        issue=8,
        cpu_metric="cpu_s_per_1k_https_req",
    ),
    Goal("https_p99_ms", "HTTPS keep-alive p99 <= 1.5x HAProxy's", "haproxy", at_most=1.5, issue=8),
    Goal(
        "tls_handshakes_per_s",
        "new TLS connections/s >= 0.7 of HAProxy",
        "haproxy",
        at_least=0.7,
        issue=8,
        cpu_metric="cpu_s_per_1k_handshakes",
    ),
)


def checked_goals(doc: Mapping[str, Any]) -> list[tuple[Goal, str]]:
    """(goal, its line) for every goal this run has the numbers for."""
    out: list[tuple[Goal, str]] = []
    for goal in GOALS:
        case = next((c for c in doc["cases"].values() if goal.metric in c.get("ratios", {})), None)
        if case is None:
            continue
        value, ok = goal.check(case)
        if value is None:
            continue
        line = f"- {goal.text}: {value:.2f} — {'met' if ok else 'NOT met'}"
        if goal.versus is not None:
            # How far the C proxies get on the same rig tells what the machine allows.
            summary = case.get("summary", {})
            base = summary.get(goal.versus, {}).get(goal.metric)
            peers = []
            for peer in ("haproxy", "nginx"):
                if peer == goal.versus:
                    continue
                s = summary.get(peer, {}).get(goal.metric)
                r = ratio(s["median"] if s else None, base["median"] if base else None)
                if r is not None:
                    peers.append(f"{peer} {r:.2f}")
            if peers:
                line += f" (same rig: {', '.join(peers)} of {goal.versus})"
        if goal.cpu_metric is not None and goal.versus is not None:
            cpu = case.get("ratios", {}).get(goal.cpu_metric, {}).get(f"edgeward/{goal.versus}")
            if cpu is not None:
                line += f"; CPU per unit of work: {cpu:.2f}x {goal.versus}'s"
        out.append((goal, line))
    return out


def goal_lines(doc: Mapping[str, Any]) -> list[str]:
    return [line for _, line in checked_goals(doc)]


def summarize_results(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Add per-case summaries and ratios to a results document (in place) and return it."""
    for case in doc["cases"].values():
        summaries = summarize_runs(case["runs"])
        case["summary"] = {
            c: {m: s.as_dict() for m, s in per.items()} for c, per in summaries.items()
        }
        case["ratios"] = ratios_of(summaries, "edgeward", PEERS)
    return dict(doc)


def _num(v: float) -> str:
    """Three significant digits, no scientific notation for the usual ranges."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def cell(s: Mapping[str, float] | None) -> str:
    """`median (min-max)` (an en dash in the output), or the median alone when there was one run."""
    if not s:
        return "—"
    if s["n"] == 1 or s["min"] == s["max"]:
        return _num(s["median"])
    return f"{_num(s['median'])} ({_num(s['min'])}{DASH}{_num(s['max'])})"


def ratio_cell(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}"


def metric_label(name: str) -> str:
    m = METRICS.get(name)
    if m is None:
        return name
    arrow = "↑" if m.better == "higher" else "↓"
    return f"{m.label} [{m.unit}] {arrow}"


def ordered_metrics(names: set[str]) -> list[str]:
    known = [m for m in METRICS if m in names]
    return known + sorted(names - set(known))


def markdown(doc: Mapping[str, Any]) -> str:
    """The README table: medians (min-max) per contestant, then edgeward's ratios."""
    meta = doc["meta"]
    env = meta["environment"]
    lines = [
        f"Benchmark of {meta['started']} (`{meta['command']}`, {meta['rounds']} round(s), "
        f"medians with min{DASH}max; ↑ higher is better, ↓ lower is better).",
        "",
        f"Machine: {env['cpu_model']}, {env['cpus']} CPUs, Linux {env['kernel']}, "
        f"Python {env['python']}. "
        + ", ".join(f"{k}: {v}" for k, v in env.get("versions", {}).items())
        + f", {env.get('iperf3', '')}.",
        "",
    ]
    if meta.get("pinning"):
        lines += [f"CPU pinning: {meta['pinning']}.", ""]
    if meta.get("results_file"):
        lines += [f"Raw runs and environment: `{meta['results_file']}`.", ""]
    if meta.get("load_tools"):
        lines += [f"Echo upstream and short-connection client: {meta['load_tools']}.", ""]
    header = ["Metric", *CONTESTANTS, *(f"edgeward / {p}" for p in PEERS)]
    rows: list[str] = []
    contestant_cases = [(n, c) for n, c in doc["cases"].items() if n not in SCRIPT_CASES]
    for _, case in contestant_cases:
        summary = case.get("summary", {})
        names = {m for per in summary.values() for m in per}
        for metric in ordered_metrics(names):
            row = [metric_label(metric)]
            row += [cell(summary.get(c, {}).get(metric)) for c in CONTESTANTS]
            ratios = case.get("ratios", {}).get(metric, {})
            row += [ratio_cell(ratios.get(f"edgeward/{p}")) for p in PEERS]
            rows.append("| " + " | ".join(row) + " |")
    if rows:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]
        lines += [
            "",
            "`direct`: the client straight to the upstream, same CPU placement, no proxy. "
            "CPU rows are the proxy's own CPU time (utime+stime), the least noisy comparison "
            "on a shared machine; memory rows are for "
            f"{meta.get('idle_connections', 9000):,} idle connections (relayed TCP, HTTP "
            "keep-alive clients, websockets).",
        ]
        if "udp" in doc["cases"]:
            lines += ["", UDP_NOTE]
        if any(name in doc["cases"] for name in HTTP_CASES):
            lines += ["", HTTP_NOTE]
    jail = doc["cases"].get("jail_lines")
    if jail and jail.get("summary"):
        lines += ["", *jail_table(jail["summary"].get("jail_lines", {}))]
    for name in SCRIPT_CASES - {"jail_lines"}:
        case = doc["cases"].get(name)
        if case and case.get("summary"):
            lines += ["", *script_table(name, case["summary"].get(name, {}))]
    goals = checked_goals(doc)
    if goals:
        issues = sorted({goal.issue for goal, _ in goals})
        which = (
            f"issue {issues[0]}"
            if len(issues) == 1
            else "issues " + ", ".join(map(str, issues[:-1])) + f" and {issues[-1]}"
        )
        lines += [
            "",
            f"Goals ({which}), from the medians above:",
            "",
            *(line for _, line in goals),
        ]
    notes = [f"- {n}" for n in meta.get("notes", [])]
    errors = [
        f"- {name} round {r['round'] + 1}, {r['contestant']}: {r['error']}"
        for name, case in doc["cases"].items()
        for r in case["runs"]
        if r.get("error")
    ]
    if notes:
        lines += ["", "Notes:", "", *notes]
    if errors:
        lines += ["", "Errors (runs without metrics are left out of the medians):", "", *errors]
    return "\n".join(lines) + "\n"


def jail_table(summary: Mapping[str, Mapping[str, float]]) -> list[str]:
    """bench/jail_lines.py's JSON, flattened to `<log>.edgeward.lines_per_s` and
    `<log>.fail2ban_regex.lines_per_s`: one row per log it measured."""
    logs = sorted(
        k.removesuffix(".edgeward.lines_per_s")
        for k in summary
        if k.endswith(".edgeward.lines_per_s")
    )
    if not logs:
        return []
    cpu = any(k.endswith(".edgeward.lines_per_cpu_s") for k in summary)
    header = (
        "| Log | edgeward [lines/s] ↑ | fail2ban-regex [lines/s] ↑ | edgeward / fail2ban-regex |"
    )
    if cpu:
        # Per CPU second is the less noisy view on a shared machine, when the script has it.
        header += " edgeward [lines/CPU s] ↑ | fail2ban-regex [lines/CPU s] ↑ | ratio per CPU s |"
    out = [
        "Jail filter speed (bench/jail_lines.py: edgeward's filter vs fail2ban-regex, "
        "same filter file and log):",
        "",
        header,
        "|" + "---|" * header.count(" | ") + "---|",
    ]
    for log in logs:
        row = [log]
        for unit in ("lines_per_s", "lines_per_cpu_s") if cpu else ("lines_per_s",):
            mine = summary.get(f"{log}.edgeward.{unit}")
            theirs = summary.get(f"{log}.fail2ban_regex.{unit}")
            r = ratio(mine["median"] if mine else None, theirs["median"] if theirs else None)
            row += [cell(mine), cell(theirs), ratio_cell(r)]
        out.append("| " + " | ".join(row) + " |")
    return out


def script_table(name: str, summary: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Every number a bench/<name>.py script reported, median (min-max) over rounds."""
    if not summary:
        return []
    out = [f"{name} (bench/{name}.py):", "", f"| Measure | median (min{DASH}max) |", "|---|---|"]
    out += [f"| {metric} | {cell(s)} |" for metric, s in sorted(summary.items())]
    return out


def _summary_median(s: Mapping[str, float] | Summary | None) -> float | None:
    if s is None:
        return None
    return s.median if isinstance(s, Summary) else float(s["median"])


def chart(doc: Mapping[str, Any], out: Path, peers: Sequence[str] = PEERS) -> Path | None:
    """Grouped horizontal bars of edgeward/peer per metric, with 1.0 marked.

    Lower-is-better metrics are drawn inverted (peer/edgeward) so that for every
    bar "longer than 1" means edgeward does better; the labels say so.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and in CI
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows: list[tuple[str, list[float | None]]] = []
    for name, case in doc["cases"].items():
        if name in SCRIPT_CASES:
            continue
        case_ratios = case.get("ratios", {})
        for metric in ordered_metrics(set(case_ratios)):
            ratios = case_ratios[metric]
            values: list[float | None] = []
            for peer in peers:
                r = ratios.get(f"edgeward/{peer}")
                if r is not None and METRICS.get(metric) and METRICS[metric].better == "lower":
                    r = 1 / r if r else None
                values.append(r)
            if any(v is not None for v in values):
                label = METRICS[metric].label if metric in METRICS else metric
                if METRICS.get(metric) and METRICS[metric].better == "lower":
                    label += " (shown as peer / edgeward)"
                rows.append((label, values))
    if not rows:
        return None
    height = 0.8 / len(peers)
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) * len(peers) / 2 + 1.8))
    for i, peer in enumerate(peers):
        ys = [j + i * height for j in range(len(rows))]
        xs = [v if v is not None else 0 for _, v_list in rows for v in [v_list[i]]]
        bars = ax.barh(ys, xs, height=height, label=f"edgeward vs {peer}")
        for bar, (_, v_list) in zip(bars, rows, strict=True):
            v = v_list[i]
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                " n/a" if v is None else f" {v:.2f}",
                va="center",
                fontsize=7,
            )
    ax.axvline(1.0, color="black", linewidth=0.8)
    top = max((v for _, vs in rows for v in vs if v is not None), default=1.0)
    ax.set_xlim(0, max(1.2, top * 1.15))  # room for the value labels
    ax.set_yticks([j + height * (len(peers) - 1) / 2 for j in range(len(rows))])
    ax.set_yticklabels([label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(
        "ratio, > 1: edgeward better (lower-is-better metrics shown inverted)", fontsize=8
    )
    ax.set_title(f"edgeward relative to peers — {doc['meta']['started']}", fontsize=10, pad=22)
    # Above the axes: inside, it covers the longest bars.
    ax.legend(
        fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(peers), frameon=False
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def absolute_chart(doc: Mapping[str, Any], out: Path) -> Path | None:
    """One small panel per metric: each contestant's median with its min-max as a
    whisker, so a reader sees the spread behind every ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels: list[tuple[str, dict[str, Mapping[str, float]]]] = []
    for name, case in doc["cases"].items():
        if name in SCRIPT_CASES:
            continue
        summary = case.get("summary", {})
        for metric in ordered_metrics({m for per in summary.values() for m in per}):
            per = {c: summary[c][metric] for c in CONTESTANTS if metric in summary.get(c, {})}
            if per:
                panels.append((metric, per))
    if not panels:
        return None
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    colors = {"direct": "#1f77b4", "haproxy": "#ff7f0e", "nginx": "#2ca02c", "edgeward": "#d62728"}
    for ax, (metric, per) in zip(axes.flat, panels, strict=False):
        names = list(per)
        med = [float(per[c]["median"]) for c in names]
        low = [m - float(per[c]["min"]) for m, c in zip(med, names, strict=True)]
        high = [float(per[c]["max"]) - m for m, c in zip(med, names, strict=True)]
        ax.bar(names, med, yerr=[low, high], capsize=3, color=[colors[c] for c in names])
        m = METRICS.get(metric)
        title = f"{m.label} [{m.unit}] {'↑' if m.better == 'higher' else '↓'}" if m else metric
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"Medians with min{DASH}max over {doc['meta']['rounds']} round(s) — {doc['meta']['started']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
