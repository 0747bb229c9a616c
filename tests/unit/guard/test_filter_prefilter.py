"""The fast paths never change a result.

Every shipped fail2ban filter is run over every sample log three ways: with
the required-word pre-screen (the default), with no pre-screen at all, and
through process_text() on the whole file.  All three must return exactly the
same failures, in the same order.  This is what makes it safe to skip the
date search and the regexes for most lines.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeward.guard.filter import Filter, FilterError, load_filter

LOGS = Path("/usr/lib/python3/dist-packages/fail2ban/tests/files/logs")
FILTERS = Path("/etc/fail2ban/filter.d")
NOW = 1_124_013_600.0

CASES = sorted(
    p.stem for p in FILTERS.glob("*.conf") if p.stem != "common" and (LOGS / p.stem).is_file()
) if FILTERS.is_dir() and LOGS.is_dir() else []


def _lines(name: str) -> list[str]:
    text = (LOGS / name).read_text(encoding="utf-8", errors="surrogateescape")
    return [ln for ln in text.split("\n") if ln and not ln.startswith("#")]


def _load(name: str, prefilter: str) -> Filter:
    flt = load_filter(name, search_dirs=(str(FILTERS),))
    flt.raw_hosts = True
    flt.clamp_future = False
    flt.set_prefilter(prefilter)
    return flt


@pytest.mark.skipif(not CASES, reason="Debian's fail2ban not installed")
@pytest.mark.parametrize("name", CASES)
def test_prefilter_is_exact(name: str) -> None:
    try:
        screened = _load(name, "literal")
    except FilterError as exc:  # pragma: no cover - every shipped filter loads
        pytest.fail(str(exc))
    lines = _lines(name)
    with_screen = [m for ln in lines for m in screened.process(ln, now=NOW)]
    plain = _load(name, "none")
    without = [m for ln in lines for m in plain.process(ln, now=NOW)]
    assert with_screen == without
    chunked = _load(name, "literal").process_text("\n".join(lines) + "\n", now=NOW)
    assert chunked == without


def test_some_filters_really_screen() -> None:
    if not CASES:
        pytest.skip("Debian's fail2ban not installed")
    screened = [n for n in CASES if load_filter(n, search_dirs=(str(FILTERS),)).prefilter_literals]
    assert len(screened) >= len(CASES) * 0.8, f"only {len(screened)} of {len(CASES)} filters screen"
