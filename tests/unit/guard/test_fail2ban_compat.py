"""fail2ban's own sample logs as edgeward's filter compatibility suite.

Debian's fail2ban ships, for most filters, a sample log whose lines carry
``# failJSON: {...}`` annotations saying whether fail2ban's filter matches the
next line, which host it reports and at what time.  We run every annotated
line through edgeward's engine (loading the shipped filter files unchanged)
with the clock and time zone fail2ban's samplestestcase.py uses, and compare
match / no match, host and time.

Agreement is reported per filter and overall (set EDGEWARD_COMPAT_REPORT=1 to
also write tests/unit/guard/compat_report.txt).  The test fails when a filter
drops below the floor recorded in FLOORS, i.e. below what edgeward reached.

edgeward follows fail2ban 1.1.x where its matching rules changed since 1.0.2
(test_fail2ban_11.py: prefregex captures merged with failregex's, ``::``, the
``{EPOCH}`` cut, escaped flag groups in date patterns, xrdp dates).  None of
those rules changes an annotation of Debian's 1.0.2 samples or a result of its
1.0.2 engine on any sample line, so no line here is an exception; one that
became one would have to be listed with its reason, never skipped silently.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgeward.guard.filter import EDGEWARD_FILTER_DIR, Filter, FilterError, load_filter

F2B = Path("/usr/lib/python3/dist-packages/fail2ban")
F2B_LOGS = F2B / "tests" / "files" / "logs"
F2B_TEST_FILTERS = F2B / "tests" / "config" / "filter.d"
SYSTEM_FILTERS = Path("/etc/fail2ban/filter.d")
OWN_LOGS = Path(__file__).with_name("logs")
REPORT = Path(__file__).with_name("compat_report.txt")

TEST_NOW = 1124013600  # fail2ban's tests/utils.py: Sun Aug 14 12:00:00 CEST 2005
TEST_TZ = "CET-01CEST-02,M3.5.0,M10.5.0"  # the offsets fail2ban's tests pin
TEST_NOW_STR = _dt.datetime.fromtimestamp(TEST_NOW, _dt.UTC).replace(tzinfo=None).isoformat()

# Reached agreement (percent) per filter; the suite fails below these.  100 is
# required for the filters edgeward's users depend on most.
REQUIRED_FULL = (
    "sshd", "nginx-http-auth", "nginx-limit-req", "nginx-botsearch", "nginx-bad-request",
    "apache-auth", "postfix", "dovecot", "ejabberd-auth", "prosody-auth",
)  # fmt: skip
OVERALL_FLOOR = 100.0
FLOORS: dict[str, float] = {}  # filters not listed here must be at 100%

_JSON_RE = re.compile(r"^#+ ?(failJSON|(?:file|filter)Options|addFILE):(.+)$")


@dataclass
class Tally:
    checks: int = 0  # annotated line x filter-option combination
    agree: int = 0
    annotations: int = 0  # distinct "# failJSON:" lines run
    failures: list[str] = field(default_factory=list)

    @property
    def pct(self) -> float:
        return 100.0 * self.agree / self.checks if self.checks else 100.0


def _filters() -> list[tuple[str, Path, Path]]:
    """(name, filter.d directory, sample log) for every filter that has a sample log."""
    out = []
    if SYSTEM_FILTERS.is_dir():
        for p in sorted(SYSTEM_FILTERS.glob("*.conf")):
            name = p.stem
            if name == "common" or not (F2B_LOGS / name).is_file():
                continue
            out.append((name, SYSTEM_FILTERS, F2B_LOGS / name))
    if F2B_TEST_FILTERS.is_dir():
        for p in sorted(F2B_TEST_FILTERS.glob("zzz-*.conf")):
            if (F2B_LOGS / p.stem).is_file():
                out.append((p.stem, F2B_TEST_FILTERS, F2B_LOGS / p.stem))
    for p in sorted(Path(EDGEWARD_FILTER_DIR).glob("*.conf")):
        if (OWN_LOGS / p.stem).is_file():
            out.append((p.stem, Path(EDGEWARD_FILTER_DIR), OWN_LOGS / p.stem))
    return out


def _lines(path: Path) -> Iterator[str]:
    with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        yield from fh


def _json_time(t: str) -> float:
    try:
        d = _dt.datetime.strptime(t, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        d = _dt.datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%f")
    return time.mktime(d.timetuple()) + d.microsecond / 1e6


def _same_host(got: str, want: Any) -> bool:
    if got == want:
        return True
    try:
        return ipaddress.ip_network(got, strict=False) == ipaddress.ip_network(str(want), strict=False)
    except ValueError:
        return False


def _test_filter_dir(tmp: Path) -> Path:
    """fail2ban's zzz-* test filters include common.conf through a path that only
    exists in fail2ban's source tree; point it at the installed one instead."""
    out = tmp / "filter.d"
    out.mkdir(parents=True, exist_ok=True)
    for p in F2B_TEST_FILTERS.glob("zzz-*.conf"):
        text = p.read_text(encoding="utf-8")
        text = re.sub(r"(?m)^(before\s*=\s*)\S*/config/filter\.d/common\.conf",
                      lambda m: m.group(1) + str(SYSTEM_FILTERS / "common.conf"), text)
        (out / p.name).write_text(text, encoding="utf-8")
    return out


def _check_filter(name: str, basedir: Path, log: Path) -> Tally:
    tally = Tally()
    cache: dict[str, Filter] = {}
    combos: list[tuple[Filter | None, dict[str, Any], str | None]] = []
    common: dict[str, Any] = {}
    files = [log]
    i = 0

    def get_filter(opts: dict[str, Any]) -> tuple[Filter | None, str | None]:
        params = {k: str(v) for k, v in opts.items() if not k.startswith("test.")}
        key = opts.get("test.filter-name") or (str(params) if params else "")
        if key not in cache:
            try:
                flt = load_filter(name, search_dirs=(str(basedir),), params=params)
            except FilterError as exc:
                return None, str(exc)
            flt.raw_hosts = True  # compare fail2ban's raw ids (DNS names too)
            flt.clamp_future = False  # sample logs are "in the future" of 2005
            cache[key] = flt
        return cache[key], None

    while i < len(files):
        it = _lines(files[i])
        i += 1
        ignore_block = False
        lineno = 0
        for line in it:
            lineno += 1
            jm = _JSON_RE.match(line)
            faildata: dict[str, Any] = {}
            if jm:
                data = json.loads(jm.group(2))
                kind = jm.group(1)
                if kind == "fileOptions":
                    common = data
                    continue
                if kind == "filterOptions":
                    combos = []
                    ignore_block = False
                    for d in data if isinstance(data, list) else [data]:
                        opts = {**common, **d} if common else d
                        if opts.get("test.condition"):
                            ignore_block = not eval(opts["test.condition"], {"name": name})
                        if not ignore_block:
                            flt, err = get_filter(opts)
                            combos.append((flt, opts, err))
                    continue
                if kind == "addFILE":
                    files.append(F2B_LOGS / data)
                    continue
                faildata = data
                try:
                    line = next(it)
                    lineno += 1
                except StopIteration:
                    break
            elif ignore_block or line.startswith("#") or not line.strip():
                continue
            if ignore_block:
                continue
            if not combos:
                flt, err = get_filter({})
                combos = [(flt, {}, err)]
            line = line.rstrip("\r\n")
            if jm:
                tally.annotations += 1
            for flt, opts, err in combos:
                if faildata.get("constraint") and not eval(
                    faildata["constraint"], {"name": name, "opts": opts}
                ):
                    continue
                where = f"{files[i - 1].name}:{lineno} {opts or ''}"
                tally.checks += 1
                if flt is None:
                    tally.failures.append(f"{where}: filter failed to load: {err}")
                    continue
                if opts.get("logtype") == "journal":
                    if opts.get("test.prefix-line"):
                        line = opts["test.prefix-line"] + line
                    got = flt.process(line, now=TEST_NOW, date=TEST_NOW)
                else:
                    got = flt.process(line, now=TEST_NOW)
                want = bool(faildata.get("match", False))
                problem = None
                if not want:
                    if got:
                        problem = f"matched (host {got[0].host}) but should not"
                elif not got:
                    problem = "not matched but should"
                elif len(got) != 1:
                    problem = f"{len(got)} matches"
                else:
                    fm = got[0]
                    if "host" in faildata and not _same_host(fm.host, faildata["host"]):
                        problem = f"host {fm.host!r} != {faildata['host']!r}"
                    elif faildata.get("time") is not None and fm.time != _json_time(faildata["time"]):
                        problem = (f"time {time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(fm.time))}"
                                   f" != {faildata['time']}")
                if problem:
                    tally.failures.append(f"{where}: {problem}: {line[:160]!r}")
                else:
                    tally.agree += 1
    return tally


@pytest.fixture(scope="module")
def compat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tally]:
    if not F2B_LOGS.is_dir() or not SYSTEM_FILTERS.is_dir():
        if os.environ.get("CI"):
            pytest.fail("Debian's fail2ban package is not installed (apt-get install fail2ban)")
        pytest.skip("Debian's fail2ban package is not installed")
    old_tz = os.environ.get("TZ")
    os.environ["TZ"] = TEST_TZ
    time.tzset()
    try:
        zzz = _test_filter_dir(tmp_path_factory.mktemp("f2b"))
        results = {
            name: _check_filter(name, zzz if d == F2B_TEST_FILTERS else d, log)
            for name, d, log in _filters()
        }
    finally:
        if old_tz is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old_tz
        time.tzset()
    total = Tally(sum(t.checks for t in results.values()), sum(t.agree for t in results.values()),
                  annotations=sum(t.annotations for t in results.values()))
    report = ["filter                       agree/checks  percent  (checks = annotated line x filterOptions)"]
    report += [f"{n:28s} {t.agree:4d}/{t.checks:<4d} {t.pct:7.2f}%" for n, t in results.items()]
    report.append(f"{'OVERALL':28s} {total.agree:4d}/{total.checks:<4d} {total.pct:7.2f}%  "
                  f"({total.annotations} failJSON annotations in {len(results)} sample logs)")
    for n, t in results.items():
        report.extend(f"  {n}: {f}" for f in t.failures)
    text = "\n".join(report) + "\n"
    print("\n" + text)
    if os.environ.get("EDGEWARD_COMPAT_REPORT") == "1":
        REPORT.write_text(text, encoding="utf-8")
    results["OVERALL"] = total
    return results


def test_overall_agreement(compat: dict[str, Tally]) -> None:
    total = compat["OVERALL"]
    assert total.checks >= 1000, "fewer sample annotations than fail2ban ships: suite is broken"
    assert total.pct >= OVERALL_FLOOR, f"overall agreement {total.pct:.2f}% < {OVERALL_FLOOR}%"


def test_required_filters_present(compat: dict[str, Tally]) -> None:
    for name in REQUIRED_FULL:
        assert name in compat and compat[name].checks > 0, f"no samples ran for {name}"


@pytest.mark.parametrize("name", [n for n, _d, _l in _filters()])
def test_filter_agreement(compat: dict[str, Tally], name: str) -> None:
    t = compat[name]
    floor = 100.0 if name in REQUIRED_FULL else FLOORS.get(name, 100.0)
    assert t.pct >= floor, f"{name}: {t.pct:.2f}% < {floor}%:\n" + "\n".join(t.failures[:20])


# --- line by line against fail2ban's own engine --------------------------------


def _fail2ban_filter(name: str) -> Any:
    """fail2ban's Filter, set up like its production jails (first matching regex wins)."""
    from fail2ban.client.filterreader import FilterReader
    from fail2ban.server.filter import Filter as F2BFilter

    flt = F2BFilter(None)
    flt.returnRawHost = True
    flt.checkFindTime = False
    flt.active = True
    reader = FilterReader(name, "jail", {}, basedir=str(SYSTEM_FILTERS.parent))
    reader.read()
    reader.getOptions({})
    for opt in reader.convert():
        for value in opt[3] if opt[0] == "multi-set" else [opt[3]]:
            key = opt[2]
            if key == "prefregex":
                flt.prefRegex = value
            elif key == "addfailregex":
                flt.addFailRegex(value)
            elif key == "addignoreregex":
                flt.addIgnoreRegex(value)
            elif key == "maxlines":
                flt.setMaxLines(value)
            elif key == "datepattern":
                flt.setDatePattern(value)
    return flt


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_sample_line_like_fail2ban_engine() -> None:
    """Not only annotated lines: every line of every sample log, in order, through
    both engines (state included); failures, hosts and times must be the same."""
    import logging
    import sys

    if str(F2B.parent) not in sys.path and F2B.is_dir():
        sys.path.append(str(F2B.parent))  # Debian's package, behind the venv's own
    try:
        from fail2ban.server.mytime import MyTime
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("Debian's fail2ban is not installed (apt-get install fail2ban)")
        pytest.skip("fail2ban's python package is not installed")
    logging.getLogger("fail2ban").setLevel(logging.CRITICAL)
    old_tz = os.environ.get("TZ")
    os.environ["TZ"] = TEST_TZ
    time.tzset()
    MyTime.setTime(TEST_NOW)
    differences: list[str] = []
    lines_run = 0
    try:
        for name, basedir, log in _filters():
            if basedir != SYSTEM_FILTERS:
                continue
            theirs = _fail2ban_filter(name)
            ours = load_filter(name, search_dirs=(str(SYSTEM_FILTERS),))
            ours.raw_hosts, ours.clamp_future = True, False
            text = log.read_text(encoding="utf-8", errors="replace")
            for line in (ln for ln in text.split("\n") if ln and not ln.startswith("#")):
                lines_run += 1
                want = [(str(fid), TEST_NOW if t is None else t)
                        for _i, fid, t, fail in theirs.processLine(line)
                        if fid is not None and not fail.get("nofail")]
                got = [(m.host, m.time) for m in ours.process(line, now=TEST_NOW)]
                if got != want:
                    differences.append(f"{name}: {line[:120]!r}: fail2ban {want} edgeward {got}")
    finally:
        MyTime.setTime(None)
        if old_tz is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old_tz
        time.tzset()
    assert lines_run > 800
    assert not differences, "\n".join(differences[:30])
