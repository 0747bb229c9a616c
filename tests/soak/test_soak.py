"""The reliability suite at full size (`make soak`); tests/reliability/test_soak_smoke.py runs it small in CI.

Each case prints its figures and PASS/FAIL per goal (and appends them as JSON lines to
$EDGEWARD_SOAK_RESULTS when set). Goals are those of issue 13.
"""

from __future__ import annotations

from pathlib import Path

import cases


def test_concurrency_9000_held_60s_with_churn(tmp_path: Path) -> None:
    rep = cases.concurrency(tmp_path, hold=9000, hold_s=60, every=5, churn=200)
    assert rep.passed, rep.render()


def test_slowloris_3000(tmp_path: Path) -> None:
    rep = cases.slowloris(tmp_path, slow=3000, rtts=200, sniff_timeout=5)
    assert rep.passed, rep.render()


def test_bad_input_storm_20000_in_60s(tmp_path: Path) -> None:
    rep = cases.storm(tmp_path, total=20000, seconds=60)
    assert rep.passed, rep.render()


def test_reload_20_times_under_300_per_s(tmp_path: Path) -> None:
    rep = cases.reload_under_load(tmp_path, reloads=20, rate=300, seconds=30)
    assert rep.passed, rep.render()


def test_ban_durability_10000(tmp_path: Path) -> None:
    rep = cases.durability(tmp_path, bans=10000)
    assert rep.passed, rep.render()
