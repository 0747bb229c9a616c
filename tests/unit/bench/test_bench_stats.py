"""Medians, min-max and ratios."""

from __future__ import annotations

import pytest
from bench.stats import Summary, ratio, ratios_of, summarize, summarize_runs


def test_summarize_odd_and_even() -> None:
    assert summarize([3.0, 1.0, 2.0]) == Summary(2.0, 1.0, 3.0, 3)
    assert summarize([4, 1, 3, 2]) == Summary(2.5, 1.0, 4.0, 4)
    assert summarize([]) is None


def test_ratio() -> None:
    assert ratio(3.0, 4.0) == 0.75
    assert ratio(None, 4.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


def test_summarize_runs_ignores_failed_runs_and_non_numbers() -> None:
    runs = [
        {"contestant": "haproxy", "metrics": {"conn_per_s": 100.0}},
        {"contestant": "haproxy", "metrics": {"conn_per_s": 300.0}},
        {"contestant": "haproxy", "metrics": {}, "error": "client crashed"},
        {"contestant": "haproxy", "metrics": {"conn_per_s": 200, "flag": True, "s": "x"}},
        {"contestant": "edgeward", "metrics": {"conn_per_s": 90.0}},
    ]
    s = summarize_runs(runs)
    assert s["haproxy"] == {"conn_per_s": Summary(200.0, 100.0, 300.0, 3)}
    assert s["edgeward"]["conn_per_s"].median == 90.0


def test_ratios_of_uses_medians_and_marks_missing_peers() -> None:
    s = summarize_runs(
        [
            {"contestant": "direct", "metrics": {"gbit": 20.0}},
            {"contestant": "haproxy", "metrics": {"gbit": 10.0, "cpu": 2.0}},
            {"contestant": "edgeward", "metrics": {"gbit": 17.0, "cpu": 1.0}},
            {"contestant": "edgeward", "metrics": {"gbit": 15.0, "cpu": 3.0}},
            {"contestant": "edgeward", "metrics": {"gbit": 16.0, "cpu": 2.0}},
        ]
    )
    r = ratios_of(s, "edgeward", ("direct", "haproxy", "nginx"))
    assert r["gbit"]["edgeward/direct"] == pytest.approx(0.8)
    assert r["gbit"]["edgeward/haproxy"] == pytest.approx(1.6)
    assert r["gbit"]["edgeward/nginx"] is None
    assert r["cpu"]["edgeward/direct"] is None
    assert r["cpu"]["edgeward/haproxy"] == pytest.approx(1.0)


def test_ratios_without_edgeward_are_all_missing() -> None:
    s = summarize_runs([{"contestant": "haproxy", "metrics": {"gbit": 10.0}}])
    assert ratios_of(s)["gbit"] == {
        "edgeward/direct": None,
        "edgeward/haproxy": None,
        "edgeward/nginx": None,
    }
