"""bench/prefilters.py: every measured pre-screen finds exactly what the default finds.

The screens only change speed; a screen that dropped a failing line would make
bench/jail_lines.py compare a cheaper but wrong engine. Each one runs over the
prosody sample log (and fail2ban's sshd sample when Debian's fail2ban is there)
and must return the same failures as no screen at all.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from bench.prefilters import KINDS, MODULES, install

from edgeward.guard.filter import EDGEWARD_FILTER_DIR, load_filter

GUARD_LOGS = Path(__file__).resolve().parents[1] / "guard" / "logs"
F2B_LOGS = Path("/usr/lib/python3/dist-packages/fail2ban/tests/files/logs")
NOW = 1_124_013_600.0


def need(kind: str) -> None:
    """re2 and hyperscan come with the bench extra: missing in CI is a failure."""
    mod = MODULES.get(kind)
    if mod is not None and importlib.util.find_spec(mod) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{mod} is not installed (pip install -e '.[bench]')")
        pytest.skip(f"{mod} is not installed")


def cases() -> list[tuple[str, Path, tuple[str, ...]]]:
    out = [("prosody-auth", GUARD_LOGS / "prosody-auth", (EDGEWARD_FILTER_DIR,))]
    if (F2B_LOGS / "sshd").is_file() and Path("/etc/fail2ban/filter.d/sshd.conf").is_file():
        out.append(("sshd", F2B_LOGS / "sshd", ("/etc/fail2ban/filter.d",)))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("name", "log", "dirs"), cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_screen_finds_what_no_screen_finds(kind: str, name: str, log: Path, dirs: tuple[str, ...]) -> None:
    need(kind)
    lines = [ln for ln in log.read_text(encoding="utf-8", errors="surrogateescape").split("\n")
             if ln and not ln.startswith("#")]

    def run(k: str) -> tuple[list[object], int]:
        flt = load_filter(name, search_dirs=dirs)
        flt.raw_hosts, flt.clamp_future = True, False
        install(flt, k)
        assert flt.prefilter == k
        found = [(m.host, m.time, m.line) for ln in lines for m in flt.process(ln, now=NOW)]
        return found, flt.stats["prefiltered"]

    want, _ = run("none")
    got, skipped = run(kind)
    assert want and got == want
    if kind != "none" and name == "prosody-auth":
        assert skipped > 0  # the screen really screened


def test_unknown_screen() -> None:
    flt = load_filter("prosody-auth", search_dirs=(EDGEWARD_FILTER_DIR,))
    with pytest.raises(ValueError, match="magic"):
        install(flt, "magic")
