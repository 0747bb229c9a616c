"""edgeward's fail2ban-compatible filter engine: config reading, matching, errors."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeward.guard.filter import EDGEWARD_FILTER_DIR, Filter, FilterError, load_filter
from edgeward.guard.types import FailMatch

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
HAS_F2B = Path("/etc/fail2ban/filter.d/sshd.conf").is_file()
needs_f2b = pytest.mark.skipif(not HAS_F2B, reason="Debian's fail2ban filters not installed")

PROSODY_FAIL = ("Nov 14 21:00:00 c2s55d5f4ebd6c0\tinfo\tFailed authentication attempt "
                "(not-authorized) for user alice@example.org from IP: 198.51.100.7")


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return p


# --- loading ----------------------------------------------------------------


def test_prosody_filter_is_shipped_and_found_by_name() -> None:
    flt = load_filter("prosody-auth", search_dirs=(EDGEWARD_FILTER_DIR,))
    [m] = flt.process(PROSODY_FAIL, now=NOW)
    assert m.host == "198.51.100.7"
    assert m.tags["user"] == "alice@example.org"
    assert m.tags["reason"] == "not-authorized"
    assert m.line == PROSODY_FAIL
    assert flt.journalmatch == ["_SYSTEMD_UNIT=prosody.service"]


def test_unknown_filter_name_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FilterError) as ei:
        load_filter("nope", search_dirs=(str(tmp_path),))
    assert "nope" in str(ei.value) and str(tmp_path) in str(ei.value)


def test_missing_path() -> None:
    with pytest.raises(FilterError) as ei:
        load_filter("/nonexistent/dir/x.conf")
    assert ei.value.path == "/nonexistent/dir/x.conf"


def test_invalid_regex_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.conf", "[Definition]\nfailregex = ^ok <HOST>$\n            ^bad( <HOST>$\n")
    with pytest.raises(FilterError) as ei:
        load_filter(str(p))
    err = ei.value
    assert (err.path, err.line) == (str(p), 3)
    assert str(err).startswith(f"{p}:3: invalid regex")
    assert "^bad(" in str(err)


def test_regex_without_host_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, "nohost.conf", "[Definition]\n\nfailregex = ^login failed$\n")
    with pytest.raises(FilterError) as ei:
        load_filter(str(p))
    assert ei.value.line == 3 and "<HOST>" in ei.value.message


def test_bad_datepattern_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, "d.conf", "[Definition]\nfailregex = ^<HOST>$\ndatepattern = %%Q-%%Y\n")
    with pytest.raises(FilterError) as ei:
        load_filter(str(p))
    assert ei.value.line == 3 and "%Q" in ei.value.message


def test_not_an_ini_file(tmp_path: Path) -> None:
    p = write(tmp_path, "x.conf", "[Definition]\nfailregex = ^<HOST>$\nthis is not ini\n")
    with pytest.raises(FilterError) as ei:
        load_filter(str(p))
    assert ei.value.line == 3


def test_missing_interpolation_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, "i.conf", "[Definition]\nfailregex = %(nothere)s <HOST>\n")
    with pytest.raises(FilterError, match=r"nothere"):
        load_filter(str(p))


def test_binary_filter_file(tmp_path: Path) -> None:
    p = tmp_path / "bin.conf"
    p.write_bytes(b"[Definition]\nfailregex = \xff\xfe <HOST>\n")
    with pytest.raises(FilterError, match="UTF-8"):
        load_filter(str(p))


def test_includes_local_overlay_known_and_init_params(tmp_path: Path) -> None:
    write(tmp_path, "base.conf", "[DEFAULT]\n_daemon = svc\n[Definition]\n__pre = ^%(_daemon)s:\n")
    write(tmp_path, "app.conf", (
        "[INCLUDES]\nbefore = base.conf\n\n"
        "[Definition]\n"
        "failregex = %(__pre)s bad login from <HOST>$\n"
        "            %(__pre)s <mode>-only failure from <HOST>$\n"
        "[Init]\nmode = normal\n"
    ))
    write(tmp_path, "app.local", (
        "[Definition]\n"
        "failregex = %(known/failregex)s\n"
        "            %(__pre)s locked out <HOST>$\n"
    ))
    flt = load_filter("app", search_dirs=(str(tmp_path),))
    assert flt.process("svc: bad login from 192.0.2.1", now=NOW)[0].host == "192.0.2.1"
    assert flt.process("svc: locked out 192.0.2.2", now=NOW)[0].host == "192.0.2.2"
    assert flt.process("svc: normal-only failure from 192.0.2.3", now=NOW)
    assert not flt.process("svc: aggressive-only failure from 192.0.2.3", now=NOW)
    aggressive = load_filter("app[mode=aggressive]", search_dirs=(str(tmp_path),))
    assert aggressive.process("svc: aggressive-only failure from 192.0.2.4", now=NOW)
    same = load_filter("app", search_dirs=(str(tmp_path),), params={"mode": "aggressive"})
    assert same.process("svc: aggressive-only failure from 192.0.2.4", now=NOW)


@needs_f2b
def test_sshd_modes_and_prefix_line() -> None:
    line = "Nov 14 21:00:00 host sshd[123]: Invalid user admin from 192.0.2.9 port 5555"
    [m] = load_filter("sshd").process(line, now=NOW)
    assert (m.host, m.tags.get("user")) == ("192.0.2.9", "admin")
    ddos = "Nov 14 21:00:01 host sshd[124]: Did not receive identification string from 192.0.2.10"
    assert not load_filter("sshd").process(ddos, now=NOW)
    assert load_filter("sshd[mode=aggressive]").process(ddos, now=NOW)[0].host == "192.0.2.10"


@needs_f2b
def test_sshd_connection_tracking_by_mlfid() -> None:
    flt = load_filter("sshd")
    lines = [
        "Nov 14 21:00:00 srv sshd[321]: Failed publickey for git from 192.0.2.1 port 1 ssh2: RSA x",
        "Nov 14 21:00:00 srv sshd[321]: Accepted publickey for git from 192.0.2.1 port 1 ssh2: RSA y",
    ]
    assert [flt.process(ln, now=NOW) for ln in lines] == [[], []]


# --- matching ---------------------------------------------------------------


def test_inline_filter_basics() -> None:
    flt = Filter.from_inline([r"^\s*auth failed for <F-USER>\S+</F-USER> from <HOST>$"],
                             ignoreregex=[r"from 192\.0\.2\.99$"])
    [m] = flt.process("2023-11-14 21:00:00 auth failed for bob from 2001:db8::1", now=NOW)
    assert isinstance(m, FailMatch)
    assert m.host == "2001:db8::1" and m.tags == {"user": "bob"}
    assert m.time == time.mktime((2023, 11, 14, 21, 0, 0, 0, 0, -1))
    assert not flt.process("2023-11-14 21:00:00 auth failed for bob from 192.0.2.99", now=NOW)
    assert not flt.process("2023-11-14 21:00:00 auth ok for bob from 192.0.2.1", now=NOW)


def test_inline_invalid_regex_names_index() -> None:
    with pytest.raises(FilterError) as ei:
        Filter.from_inline([r"^ok <HOST>$", r"^(unclosed <HOST>"])
    assert (ei.value.path, ei.value.line) == ("<inline failregex>", 2)


def test_inline_needs_a_regex() -> None:
    with pytest.raises(FilterError):
        Filter.from_inline([])


def test_host_forms_are_normalised() -> None:
    flt = Filter.from_inline([r"^x <ADDR>$"], datepattern="{NONE}")
    assert flt.process("x ::ffff:192.0.2.5", now=NOW)[0].host == "192.0.2.5"
    assert flt.process("x [2001:DB8:0::1]", now=NOW)[0].host == "2001:db8::1"
    assert not flt.process("x 999.1.1.1", now=NOW)  # looks like IPv4, is not
    assert flt.stats["not_address"] == 1


def test_subnet_and_cidr() -> None:
    flt = Filter.from_inline([r"^net <SUBNET>$"], datepattern="{NONE}")
    assert flt.process("net 192.0.2.77/24", now=NOW)[0].host == "192.0.2.0/24"
    assert flt.process("net 192.0.2.77", now=NOW)[0].host == "192.0.2.77"


def test_dns_names_are_counted_not_banned() -> None:
    flt = Filter.from_inline([r"^bad client <HOST>$"], datepattern="{NONE}")
    assert flt.process("bad client mail.example.org", now=NOW) == []
    assert flt.stats["dns"] == 1
    flt.raw_hosts = True
    assert flt.process("bad client mail.example.org", now=NOW)[0].host == "mail.example.org"


def test_fid_that_is_not_an_address_is_counted() -> None:
    flt = Filter.from_inline([r"^locked <F-ID>\S+</F-ID>$"], datepattern="{NONE}")
    assert flt.process("locked alice", now=NOW) == []
    assert flt.stats["not_address"] == 1


def test_nofail_without_mlfid_is_no_failure() -> None:
    flt = Filter.from_inline([r"^<F-NOFAIL>probe</F-NOFAIL> from <HOST>$", r"^fail from <HOST>$"],
                             datepattern="{NONE}")
    assert flt.process("probe from 192.0.2.1", now=NOW) == []
    assert flt.process("fail from 192.0.2.1", now=NOW)


def test_multiline_with_skiplines() -> None:
    flt = Filter.from_inline(
        [r"^\[(?P<pid>\d+)\] login attempt<SKIPLINES>\[(?P=pid)\] refused for <HOST>$"],
        maxlines=5, datepattern="{NONE}",
    )
    assert flt.process("[7] login attempt", now=NOW) == []
    assert flt.process("[8] unrelated", now=NOW) == []
    [m] = flt.process("[7] refused for 192.0.2.3", now=NOW)
    assert m.host == "192.0.2.3"
    assert m.line == "[7] login attempt\n[7] refused for 192.0.2.3"


def test_prefregex_content() -> None:
    flt = Filter(failregex=[(r"^denied <HOST>$", _o())], prefregex=(r"^app: <F-CONTENT>.+</F-CONTENT>$", _o()),
                 datepattern="{NONE}")
    assert flt.process("app: denied 192.0.2.4", now=NOW)[0].host == "192.0.2.4"
    assert not flt.process("other: denied 192.0.2.4", now=NOW)


def _o():  # type: ignore[no-untyped-def]
    from edgeward.guard.filter import _Origin

    return _Origin(None, None)


def test_known_date_skips_detection() -> None:
    flt = Filter.from_inline([r"fail <HOST>"])
    [m] = flt.process("2001-01-01 00:00:00 fail 192.0.2.1", now=NOW, date=NOW - 5)
    assert m.time == NOW - 5


# --- dates ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datepattern", "line", "expected"),
    [
        ("EPOCH", "1700000000 fail 192.0.2.1", 1_700_000_000.0),
        ("{^LN-BEG}EPOCH", "1700000000.250 fail 192.0.2.1", 1_700_000_000.25),
        ("LEPOCH", "1700000000123 fail 192.0.2.1", 1_700_000_000.123),
        ("TAI64N", "@4000000065540380000000aa fail 192.0.2.1", 1_700_004_736.0),
        (None, "2023-11-14T21:00:00+02:00 fail 192.0.2.1", 1_699_988_400.0),
        (None, "2023-11-14T21:00:00Z fail 192.0.2.1", 1_699_995_600.0),
        (None, "[14/Nov/2023:21:00:00 -0500] fail 192.0.2.1", 1_700_013_600.0),
        ("^%%Y-%%m-%%d %%H:%%M:%%S %%z", "2023-11-14 21:00:00 +0100 fail 192.0.2.1", 1_699_992_000.0),
    ],
)
def test_date_formats(datepattern: str | None, line: str, expected: float) -> None:
    flt = Filter.from_inline([r"fail <HOST>$"], datepattern=datepattern.replace("%%", "%") if datepattern else None)
    [m] = flt.process(line, now=NOW + 86400 * 30)
    assert m.time == expected


def test_year_inference_picks_last_year_for_december_in_january() -> None:
    jan2 = time.mktime((2024, 1, 2, 12, 0, 0, 0, 0, -1))
    flt = Filter.from_inline([r"fail <HOST>$"])
    [m] = flt.process("Dec 31 23:59:00 host app: fail 192.0.2.1", now=jan2)
    assert time.localtime(m.time)[:3] == (2023, 12, 31)


def test_future_dates_are_clamped_past_dates_kept() -> None:
    flt = Filter.from_inline([r"fail <HOST>$"])
    [fut] = flt.process("2029-01-01 00:00:00 fail 192.0.2.1", now=NOW)
    assert fut.time == NOW
    [old] = flt.process("2001-01-01 00:00:00 fail 192.0.2.1", now=NOW)
    assert old.time == time.mktime((2001, 1, 1, 0, 0, 0, 0, 0, -1))


def test_no_date_uses_now() -> None:
    flt = Filter.from_inline([r"^fail <HOST>$"])
    [m] = flt.process("fail 192.0.2.1", now=NOW)
    assert m.time == NOW


def test_impossible_date_does_not_crash() -> None:
    flt = Filter.from_inline([r"fail <HOST>$"], datepattern="^%Y-%m-%d %H:%M:%S")
    [m] = flt.process("2023-02-30 10:00:00 fail 192.0.2.1", now=NOW)
    assert m.time == NOW


# --- bad input --------------------------------------------------------------


def prosody() -> Filter:
    return load_filter("prosody-auth", search_dirs=(EDGEWARD_FILTER_DIR,))


def test_binary_garbage_and_invalid_utf8() -> None:
    flt = prosody()
    garbage = bytes(range(256)).decode("latin-1") * 20
    assert flt.process(garbage, now=NOW) == []
    bad = b"Nov 14 21:00:00 c2s1\tinfo\tFailed authentication attempt (x) for user \xff\xc3( from IP: 192.0.2.1"
    line = bad.decode("utf-8", "surrogateescape")
    [m] = flt.process(line, now=NOW)  # still the real address, taken from valid text
    assert m.host == "192.0.2.1"
    assert flt.process("\x00" * 1000 + PROSODY_FAIL.replace("Nov", "\x00"), now=NOW) == []


def test_megabyte_line_is_cut_and_counted() -> None:
    flt = prosody()
    long_line = "Nov 14 21:00:00 c2s1\tinfo\t" + "A" * 1_000_000 + " Failed authentication attempt (x) for user u from IP: 192.0.2.1"
    t0 = time.perf_counter()
    assert flt.process(long_line, now=NOW) == []  # the failure text is past the cut
    assert time.perf_counter() - t0 < 2.0
    assert flt.stats["truncated"] == 1
    small = Filter.from_inline([r"^x <HOST>$"], datepattern="{NONE}", max_line_bytes=16)
    assert small.process("x 192.0.2.1", now=NOW)
    assert not small.process("x 192.0.2.1" + " " * 10 + "1", now=NOW)  # cut to "x 192.0.2.1     "
    assert small.stats["truncated"] == 1


def test_backtracking_regex_is_bounded_by_the_cut() -> None:
    flt = Filter.from_inline([r"^(a+)+b <HOST>$"], datepattern="{NONE}", max_line_bytes=20)
    assert any("nested repetition" in u for u in flt.unsupported)
    t0 = time.perf_counter()
    assert flt.process("a" * 100_000, now=NOW) == []
    assert time.perf_counter() - t0 < 5.0


def test_crafted_user_name_cannot_redirect_the_ban() -> None:
    flt = prosody()
    evil = ("Nov 14 21:00:00 c2s1\tinfo\tFailed authentication attempt (not-authorized) for user "
            "x from IP: 192.0.2.1 from IP: ?")
    assert flt.process(evil, now=NOW) == []


def test_process_is_thread_safe() -> None:
    flt = prosody()
    results: list[int] = []

    def work() -> None:
        n = 0
        for _ in range(300):
            n += len(flt.process(PROSODY_FAIL, now=NOW))
            n += len(flt.process("Nov 14 21:00:00 c2s1\tinfo\tClient connected", now=NOW))
        results.append(n)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [300] * 4
    assert flt.stats["lines"] == 2400


def test_process_text_equals_line_by_line() -> None:
    lines = [PROSODY_FAIL, "Nov 14 21:00:01 c2s1\tinfo\tClient connected",
             PROSODY_FAIL.replace("198.51.100.7", "2001:db8::5"),
             "Nov 14 21:00:02 c2s1\tinfo\tSuccessful authentication as a@b from IP: 192.0.2.1"]
    a = prosody()
    by_line = [m for ln in lines for m in a.process(ln, now=NOW)]
    b = prosody()
    assert b.process_text("\n".join(lines) + "\n", now=NOW) == by_line
    assert b.stats["lines"] == 4 and b.stats["prefiltered"] == 2


# The other screens (re, re2, hyperscan) are bench-only: tests/unit/bench/test_bench_prefilters.py
@pytest.mark.parametrize("kind", ["literal", "none"])
def test_prefilter_choices_agree(kind: str) -> None:
    flt = prosody()
    flt.set_prefilter(kind)
    assert flt.prefilter == kind
    assert flt.process(PROSODY_FAIL, now=NOW)
    assert not flt.process("Nov 14 21:00:02 c2s1\tinfo\tSuccessful authentication as a@b", now=NOW)
    assert flt.stats["prefiltered"] == (1 if kind == "literal" else 0)
    with pytest.raises(ValueError):
        flt.set_prefilter("magic")


def test_a_screen_plugged_in_decides_which_lines_are_examined() -> None:
    flt = prosody()
    seen: list[str] = []

    def screen(line: str) -> bool:
        seen.append(line)
        return "Failed" in line

    flt.set_screen("mine", screen)
    assert flt.prefilter == "mine"
    assert flt.process(PROSODY_FAIL, now=NOW)
    assert not flt.process("Nov 14 21:00:02 c2s1\tinfo\tSuccessful authentication as a@b", now=NOW)
    assert seen == [PROSODY_FAIL, "Nov 14 21:00:02 c2s1\tinfo\tSuccessful authentication as a@b"]
    assert flt.stats["prefiltered"] == 1
    flt.set_prefilter("literal")
    assert flt.process(PROSODY_FAIL, now=NOW) and len(seen) == 2


def test_unbounded_date_between_letters_disables_word_screen() -> None:
    # the date sits inside a word; cut out, the failregex sees "abcdef"
    flt = Filter.from_inline([r"^abcdef <HOST>$"], datepattern="{UNB}%H:%M:%S")
    assert flt.prefilter_literals is None
    [m] = flt.process("abc12:00:00def 192.0.2.1", now=NOW)
    assert m.host == "192.0.2.1"
    bounded = Filter.from_inline([r"^abcdef <HOST>$"], datepattern="%H:%M:%S")
    assert bounded.prefilter_literals == (("abcdef",),)


def test_default_tz_for_dates_without_zone() -> None:
    flt = Filter.from_inline([r"fail <HOST>$"], default_tz="UTC")
    [m] = flt.process("2023-11-14 22:13:20 fail 192.0.2.1", now=NOW + 60)
    assert m.time == NOW
    with pytest.raises(FilterError):
        Filter.from_inline([r"fail <HOST>$"], default_tz="Mars/Olympus")


# --- properties ---------------------------------------------------------------

_PIECES = st.sampled_from([
    "Nov 14 21:00:00 ", "2023-11-14T21:00:00Z ", "1700000000 ", "@4000000065540380000000aa ",
    "c2s1\tinfo\t", "Failed authentication attempt ", "(not-authorized) ", "for user ",
    "a@b ", "from IP: ", "192.0.2.1", "2001:db8::1", "?", " ", "\t", "[", "]", ":", "\x00",
    "\udcff", "é", "Dec 31 23:59:59 ", "9999-12-31 23:59:59 ", "0000-00-00 00:00:00 ",
])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES, max_size=12).map("".join) | st.text(max_size=300))
def test_random_lines_never_crash_and_never_invent_a_failure(line: str) -> None:
    flt = prosody()
    for m in flt.process(line, now=NOW) + flt.process_text(line + "\n", now=NOW):
        # a failure is only reported for a line that really has the phrase and the address
        assert "Failed authentication attempt (" in line
        assert m.host in line or m.host.replace("::ffff:", "") in line
        assert line.rstrip().endswith(m.host) or "::ffff:" in line or ":" in m.host


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_default_dates_never_crash(text: str) -> None:
    flt = Filter.from_inline([r"zzq <ADDR>$"])
    for m in flt.process(text + " zzq 192.0.2.1", now=NOW):
        assert m.host == "192.0.2.1"
        assert m.time <= NOW


def test_process_lines_equals_line_by_line() -> None:
    lines = [PROSODY_FAIL, "Nov 14 21:00:01 c2s1\tinfo\tClient connected\n",
             PROSODY_FAIL.replace("198.51.100.7", "2001:db8::5") + "\r\n"]
    a = prosody()
    by_line = [m for ln in lines for m in a.process(ln, now=NOW)]
    b = prosody()
    assert b.process_lines(lines, now=NOW) == by_line and len(by_line) == 2
    assert b.stats == a.stats
