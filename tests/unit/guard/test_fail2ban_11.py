"""Matching rules that changed between fail2ban 1.0.2 (Debian bookworm) and 1.1.x: edgeward follows 1.1.

Each case comes from fail2ban's own 1.1 tests or ChangeLog:

1. prefregex captures are no longer wiped by a group of failregex that did not
   take part in the match (filter.py: ``fail.update((k, v) ... if v is not None)``;
   fail2ban's testFrmtOutputAddrInHeadOrBody);
2. ``IP_6_RE`` takes a lone ":" step, so ``::`` and ``::/32`` are addresses
   (commit "fixes recognition of `::` and `::/32`"; DNSUtilsNetworkTests);
3. a ``{EPOCH}`` date pattern with a group of its own cuts out only that
   group (datedetectortestcase.py: testGetEpochPatternCut);
4. an escaped ``\\(?i)`` in a date pattern is no global flag group
   (datetemplate.py: RE_GLOBALFLAGS lookbehind);
5. the default date templates read xrdp's ``20220407-12:16:59`` (ChangeLog 1.1.1:
   "extend date regex to include xrdp's %Y%m%d-%H:%M:%S format").

None of these changes any annotated line of Debian's 1.0.2 sample logs, nor any
line of them run through Debian's 1.0.2 engine (test_fail2ban_compat.py stays
at 100% with no listed exception). `test_debian_1_0_2_engine_still_answers_the_old_way`
shows that each case here does exercise a changed rule: 1.0.2 answers otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgeward.guard.datedetect import DateDetector
from edgeward.guard.filter import Filter
from edgeward.guard.types import FailMatch

NOW = 1_124_013_600.0

# (prefregex, failregexes, datepattern, lines) -> what fail2ban 1.1 reports per line:
# [(failure id, time or None for "now", {tag: value})]
CASES: dict[str, tuple[str | None, list[str], str | None, list[str], list[list[tuple[str, float | None, dict[str, str]]]]]] = {
    "prefregex address kept when the failregex's optional address is absent": (
        r"^(?:head:\s*\{\s*ip: <ADDR>\s*\},\s*)?<F-CONTENT>.+</F-CONTENT>$",
        [r"^auth failed(?: from <ADDR>)?"],
        "{NONE}",
        ["head: { ip: 192.0.2.1 }, auth failed", "auth failed from 192.0.2.2"],
        [[("192.0.2.1", None, {})], [("192.0.2.2", None, {})]],
    ),
    "prefregex tag kept when the failregex's optional group of that name is absent": (
        r"^svc: user <F-USER>\S+</F-USER> <F-CONTENT>.+</F-CONTENT>$",
        [r"^auth failed(?: for (?P<user>\S+))? from <ADDR>$"],
        "{NONE}",
        ["svc: user alice auth failed from 192.0.2.3", "svc: user alice auth failed for bob from 192.0.2.4"],
        [[("192.0.2.3", None, {"user": "alice"})], [("192.0.2.4", None, {"user": "bob"})]],
    ),
    "IPv6 :: and ::/32": (
        None,
        [r"^auth failed from <HOST>$", r"^denied <SUBNET>$"],
        "{NONE}",
        ["auth failed from ::", "auth failed from ::1", "denied ::/32", "auth failed from 2001:db8::1"],
        [[("::", None, {})], [("::1", None, {})], [("::/32", None, {})], [("2001:db8::1", None, {})]],
    ),
    "{EPOCH} pattern with a group cuts out the epoch only": (
        None,
        [r"^type=USER_AUTH msg=audit\(:\d+\): .*res=failed addr=<ADDR>$"],
        r"^type=\S+ msg=audit\(({EPOCH})",
        ["type=USER_AUTH msg=audit(1106513999.000:987): pid=1 res=failed addr=192.0.2.5"],
        [[("192.0.2.5", 1106513999.0, {})]],
    ),
    "xrdp dates by the default templates": (
        None,
        [r"AUTHFAIL: user=\S+ ip=<ADDR>"],
        None,
        ["[20220407-12:16:59] [INFO ] AUTHFAIL: user=x ip=192.0.2.6"],
        [[("192.0.2.6", time.mktime((2022, 4, 7, 12, 16, 59, 0, 0, -1)), {})]],
    ),
}


def edgeward_filter(pref: str | None, fails: list[str], dp: str | None, *, raw: bool = False) -> Filter:
    flt = Filter.from_inline(fails, [], dp, prefregex=pref)
    flt.raw_hosts, flt.clamp_future = raw, False
    return flt


def summary(m: FailMatch) -> tuple[str, float | None, dict[str, str]]:
    return m.host, None if m.time == NOW else m.time, {k: v for k, v in m.tags.items() if k == "user"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_edgeward_follows_fail2ban_1_1(case: str) -> None:
    pref, fails, dp, lines, want = CASES[case]
    flt = edgeward_filter(pref, fails, dp)
    assert [[summary(m) for m in flt.process(ln, now=NOW)] for ln in lines] == want


def test_a_lone_colon_step_is_still_no_address_to_ban() -> None:
    # 1.1's IPv6 regex also takes ":22"; fail2ban reports it as a raw id, edgeward
    # bans addresses only: counted as not an address, never returned
    flt = edgeward_filter(None, [r"^auth failed from <HOST>$"], "{NONE}", raw=False)
    assert flt.process("auth failed from :22", now=NOW) == []
    assert flt.stats["not_address"] == 1
    assert [m.host for m in flt.process("auth failed from ::", now=NOW)] == ["::"]


def test_epoch_pattern_cut_like_fail2ban_test() -> None:
    dd = DateDetector(r"^type=\S+ msg=audit\(({EPOCH})")
    line = "type=USER_AUTH msg=audit(1106513999.000:987)"
    m, tpl = dd.match(line)
    assert m is not None and tpl is not None
    assert line[m.start(1):m.end(1)] == "1106513999.000"
    assert dd.parse(m, tpl, NOW) == 1106513999.0
    # without a group of its own the whole match is cut, as before
    m, _ = DateDetector(r"^type=\S+ msg=audit\({EPOCH}").match(line)
    assert m is not None and m.group(1) == "type=USER_AUTH msg=audit(1106513999.000"


def test_escaped_paren_before_flags_is_no_global_flag_group() -> None:
    # 1.0.2 moved "(?i)" out of "\(?i)" and broke the pattern ("missing )")
    dd = DateDetector(r"^(?:at\(?i)?%H:%M:%S")
    m, tpl = dd.match("ati12:00:00 x")
    assert m is not None and tpl is not None and m.group(1) == "ati12:00:00"


@pytest.mark.parametrize(("line", "text"), [
    ("20050123-21:59:59 x", "20050123-21:59:59"),  # new in 1.1
    ("20050123 215959 x", "20050123 215959"),
    ("20050123T215959 x", "20050123T215959"),
])
def test_compact_iso_dates(line: str, text: str) -> None:
    dd = DateDetector()
    m, tpl = dd.match(line)
    assert m is not None and tpl is not None and m.group(1) == text
    assert dd.parse(m, tpl, NOW) == time.mktime((2005, 1, 23, 21, 59, 59, 0, 0, -1))


# --- the same cases through Debian's fail2ban 1.0.2: it answers the old way ---------------

F2B = Path("/usr/lib/python3/dist-packages/fail2ban")

# What 1.0.2 reports instead of CASES' answers, per case and line (None: same as 1.1).
OLD = {
    "prefregex address kept when the failregex's optional address is absent": [[], None],
    "prefregex tag kept when the failregex's optional group of that name is absent": [
        [("192.0.2.3", None, {})], None],
    "IPv6 :: and ::/32": [[], None, [], None],
    "{EPOCH} pattern with a group cuts out the epoch only": [[]],
    "xrdp dates by the default templates": [[("192.0.2.6", None, {})]],
}


def _fail2ban_1_0_2(pref: str | None, fails: list[str], dp: str | None, lines: list[str]) -> list[Any]:
    from fail2ban.server.filter import Filter as F2BFilter

    f = F2BFilter(None)
    f.returnRawHost, f.checkFindTime, f.active = True, False, True
    if pref:
        f.prefRegex = pref
    for r in fails:
        f.addFailRegex(r)
    if dp:
        f.setDatePattern(dp)
    out = []
    for ln in lines:
        got = []
        for _i, fid, t, fail in f.processLine(ln):
            tags = {"user": fail["user"]} if fail.get("user") else {}
            got.append((str(fid), None if t is None or t == NOW else t, tags))
        out.append(got)
    return out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_debian_1_0_2_engine_still_answers_the_old_way() -> None:
    if str(F2B.parent) not in sys.path and F2B.is_dir():
        sys.path.append(str(F2B.parent))
    try:
        from fail2ban.server.mytime import MyTime
        from fail2ban.version import version
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("Debian's fail2ban is not installed (apt-get install fail2ban)")
        pytest.skip("fail2ban's python package is not installed")
    if not version.startswith("1.0."):
        pytest.skip(f"fail2ban {version} is not the 1.0.x these differences are about")
    logging.getLogger("fail2ban").setLevel(logging.CRITICAL)
    MyTime.setTime(int(NOW))
    try:
        for case, (pref, fails, dp, lines, new) in CASES.items():
            old = [n if o is None else o for o, n in zip(OLD[case], new, strict=True)]
            assert old != new, case
            assert _fail2ban_1_0_2(pref, fails, dp, lines) == old, case
    finally:
        MyTime.setTime(None)
