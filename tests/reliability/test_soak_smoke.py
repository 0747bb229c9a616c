"""Small versions of the reliability suite's cases (tests/soak runs them full size with `make soak`).

Same code, same goals, counts that fit CI: each prints its figures and PASS/FAIL per goal.
"""

from __future__ import annotations

from pathlib import Path

import cases


def test_concurrency_smoke(tmp_path: Path) -> None:
    rep = cases.concurrency(tmp_path, hold=300, hold_s=5, every=1, churn=50)
    assert rep.passed, rep.render()


def test_slowloris_smoke(tmp_path: Path) -> None:
    rep = cases.slowloris(tmp_path, slow=200, rtts=50, sniff_timeout=3)
    assert rep.passed, rep.render()


def test_bad_input_storm_smoke(tmp_path: Path) -> None:
    rep = cases.storm(tmp_path, total=1000, seconds=5)
    assert rep.passed, rep.render()


def test_reload_under_load_smoke(tmp_path: Path) -> None:
    rep = cases.reload_under_load(tmp_path, reloads=5, rate=100, seconds=5)
    assert rep.passed, rep.render()


def test_ban_durability_smoke(tmp_path: Path) -> None:
    rep = cases.durability(tmp_path, bans=300)
    assert rep.passed, rep.render()
