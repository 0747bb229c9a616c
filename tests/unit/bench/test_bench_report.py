"""The README table and the ratio chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bench import cli
from bench.report import (
    absolute_chart,
    cell,
    chart,
    goal_lines,
    jail_table,
    markdown,
    script_table,
    summarize_results,
)


def _doc() -> dict[str, Any]:
    def run(c: str, **metrics: float) -> dict[str, Any]:
        return {"contestant": c, "round": 0, "metrics": metrics, "raw": {}}

    return {
        "meta": {
            "started": "2026-11-21 17:00:00Z",
            "command": "python -m bench --quick",
            "rounds": 3,
            "pinning": "off",
            "notes": ["nginx had a cold"],
            "environment": {
                "cpu_model": "Test CPU",
                "cpus": 2,
                "kernel": "6.1",
                "python": "3.11.7",
                "versions": {"haproxy": "HAProxy 2.6"},
                "iperf3": "iperf 3.12",
            },
        },
        "cases": {
            "tcp_bulk": {
                "runs": [
                    run("direct", gbit_s_p1=20.0),
                    run("direct", gbit_s_p1=22.0),
                    run("direct", gbit_s_p1=21.0),
                    run("haproxy", gbit_s_p1=10.0, cpu_s_per_gb_p1=0.4),
                    run("edgeward", gbit_s_p1=17.0, cpu_s_per_gb_p1=0.2),
                    {**run("nginx"), "metrics": {}, "error": "iperf3: unable to connect"},
                ]
            },
            "jail_lines": {
                "runs": [
                    {
                        "contestant": "jail_lines",
                        "round": 0,
                        "raw": {},
                        "metrics": {
                            "sshd.edgeward.lines_per_s": 60000.0,
                            "sshd.fail2ban_regex.lines_per_s": 20000.0,
                            "lines": 1000.0,
                        },
                    },
                ]
            },
        },
    }


def test_cell_formats() -> None:
    assert cell(None) == "—"
    assert cell({"median": 21.0, "min": 20.0, "max": 22.0, "n": 3}) == "21.0 (20.0\u201322.0)"
    assert cell({"median": 14184.2, "min": 14184.2, "max": 14184.2, "n": 1}) == "14,184"
    assert cell({"median": 0.04755, "min": 0.04755, "max": 0.04755, "n": 1}) == "0.0476"


def test_markdown_table_has_medians_ranges_and_ratios() -> None:
    md = markdown(summarize_results(_doc()))
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| Metric"))
    assert header.split(" | ")[1:5] == ["direct", "haproxy", "nginx", "edgeward"]
    assert "edgeward / direct" in header and "edgeward / haproxy" in header
    row = next(line for line in lines if line.startswith("| TCP bulk, 1 stream"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "21.0 (20.0\u201322.0)"
    assert cells[2:5] == ["10.0", "—", "17.0"]
    assert cells[5:] == ["0.81", "1.70", "—"]
    cpu = next(line for line in lines if line.startswith("| CPU per GB relayed, 1 stream"))
    assert "↓" in cpu and cpu.rstrip(" |").endswith("—")
    # Every table row has as many cells as the header.
    width = header.count("|")
    assert all(
        line.count("|") == width
        for line in lines
        if line.startswith("| ") and "Log" not in line and "sshd" not in line
    )
    # Failed runs are listed, not silently dropped; notes are shown.
    assert "iperf3: unable to connect" in md
    assert "nginx had a cold" in md
    assert "Test CPU" in md and "HAProxy 2.6" in md


def test_jail_table() -> None:
    s = {
        "sshd.edgeward.lines_per_s": {"median": 60000.0, "min": 60000.0, "max": 60000.0, "n": 1},
        "sshd.fail2ban_regex.lines_per_s": {"median": 20000.0, "min": 2e4, "max": 2e4, "n": 1},
    }
    rows = jail_table(s)
    assert rows[-1] == "| sshd | 60,000 | 20,000 | 3.00 |"
    assert jail_table({}) == []
    one = {"median": 1.0, "min": 1.0, "max": 1.0, "n": 1}
    with_cpu = {
        **s,
        "sshd.edgeward.lines_per_cpu_s": {**one, "median": 90000.0},
        "sshd.fail2ban_regex.lines_per_cpu_s": {**one, "median": 30000.0},
    }
    rows = jail_table(with_cpu)
    assert rows[2].count("|") == rows[3].count("|") == rows[4].count("|") == 8
    assert rows[-1].endswith("| 90,000 | 30,000 | 3.00 |")
    assert "| sshd | 60,000 | 20,000 | 3.00 |" in markdown(summarize_results(_doc()))


def test_chart_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = chart(summarize_results(_doc()), tmp_path / "ratios.png")
    assert out is not None
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_chart_without_edgeward(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    doc = _doc()
    for case in doc["cases"].values():
        case["runs"] = [r for r in case["runs"] if r["contestant"] != "edgeward"]
    assert chart(summarize_results(doc), tmp_path / "ratios.png") is None


def test_goals_are_checked_against_medians() -> None:
    doc = summarize_results(_doc())
    lines = goal_lines(doc)
    # edgeward/direct for 1 stream is 17/21 = 0.81 < 0.85; other goals have no data here.
    assert lines == [
        "- TCP bulk 1 stream >= 0.85 of direct: 0.81 — NOT met (same rig: haproxy 0.48 of direct)"
    ]
    assert "Goals (issue 2)" in markdown(doc)


def test_report_rerenders_from_a_results_file(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    doc = _doc()
    doc["meta"]["seconds"] = 1.0
    src = tmp_path / "20261121T170000Z.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "out"
    assert cli.main(["--report", str(src), "--out", str(out)]) == 0
    assert "| TCP bulk, 1 stream" in (out / "latest.md").read_text()
    assert (out / "latest-ratios.png").exists()
    assert (out / "latest-absolute.png").exists()
    assert not list(out.glob("*.json"))


def test_absolute_chart_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = absolute_chart(summarize_results(_doc()), tmp_path / "absolute.png")
    assert out is not None
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_table() -> None:
    one = {"median": 12.5, "min": 10.0, "max": 15.0, "n": 3}
    rows = script_table("ban_latency", {"p50_ms": one})
    assert rows[0] == "ban_latency (bench/ban_latency.py):"
    assert rows[-1] == "| p50_ms | 12.5 (10.0\u201315.0) |"
    assert script_table("ban_latency", {}) == []


def test_http_goals_of_issue_8() -> None:
    def run(c: str, **metrics: float) -> dict[str, Any]:
        return {"contestant": c, "round": 0, "metrics": metrics, "raw": {}}

    doc = _doc()
    doc["cases"]["http_keepalive"] = {
        "runs": [
            run("direct", http_req_per_s=40000.0, http_p99_ms=1.0),
            run("haproxy", http_req_per_s=20000.0, http_p99_ms=4.0, cpu_s_per_1k_http_req=0.01),
            run("nginx", http_req_per_s=18000.0, http_p99_ms=5.0, cpu_s_per_1k_http_req=0.008),
            run("edgeward", http_req_per_s=15000.0, http_p99_ms=7.0, cpu_s_per_1k_http_req=0.04),
        ]
    }
    doc["cases"]["tls_handshakes"] = {
        "runs": [
            run("haproxy", tls_handshakes_per_s=1000.0, cpu_s_per_1k_handshakes=0.2),
            run("edgeward", tls_handshakes_per_s=600.0, cpu_s_per_1k_handshakes=0.5),
        ]
    }
    doc = summarize_results(doc)
    lines = goal_lines(doc)
    assert (
        "- HTTP keep-alive requests/s >= 0.7 of HAProxy: 0.75 — met (same rig: nginx 0.90 of "
        "haproxy); CPU per unit of work: 4.00x haproxy's"
    ) in lines
    assert (
        "- HTTP keep-alive p99 <= 1.5x HAProxy's: 1.75 — NOT met (same rig: nginx 1.25 of haproxy)"
        in lines
    )
    assert (
        "- new TLS connections/s >= 0.7 of HAProxy: 0.60 — NOT met; CPU per unit of work: "
        "2.50x haproxy's"
    ) in lines
    md = markdown(doc)
    assert "Goals (issues 2 and 8)" in md
    assert "HTTP rows: `wrk -t1 -c50" in md
    row = next(line for line in md.splitlines() if line.startswith("| HTTP keep-alive latency p99"))
    assert row.rstrip(" |").endswith("7.00 | 1.75 | 1.40")
