"""Finding and parsing the date of a log line, the way fail2ban's filters expect.

fail2ban filters carry a ``datepattern`` (or rely on fail2ban's default list
of date templates); failregexes are then matched against the line *with the
date cut out*.  To run those filters unchanged we reproduce the template
syntax (``%Y``/``%ExY``/... directives, ``{^LN-BEG}``, ``{DEFAULT}``,
``{DATE}``, ``{NONE}``, ``{UNB}``, ``EPOCH``/``LEPOCH``/``TAI64N``), the
word/line boundaries fail2ban adds around templates, the choice between
several matching templates, and the year/day inference for dates without a
year.  This is an independent implementation of that documented behaviour;
fail2ban itself is not imported.

Times are interpreted in the process' local time zone unless the date carries
an offset (``%z``/``%Z``) or the detector has a fixed ``default_tz`` offset,
exactly like fail2ban (which uses ``time.mktime``).
"""

from __future__ import annotations

import calendar
import datetime as _dt
import re
import time
from collections.abc import Callable, Iterable

__all__ = ["DateDetector", "DatePatternError", "DateTemplate", "parse_tz_offset"]


class DatePatternError(ValueError):
    """A ``datepattern`` that cannot be turned into a date template."""


# --- %-directives --------------------------------------------------------

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS_FULL = (
    "january", "february", "march", "april", "may", "june", "july",
    "august", "september", "october", "november", "december",
)  # fmt: skip
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAYS_FULL = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _alt(words: Iterable[str]) -> str:
    # longest first so that "may" does not win over "mayday"-like prefixes
    return "|".join(sorted(words, key=len, reverse=True))


# Zone abbreviations and their offsets in minutes: the fixed-offset table
# fail2ban documents for %Z/%Exz (no DST switching, by design).
_TZ_TABLE = """
-12 Y
-11 X NUT SST
-10 W CKT HAST HST TAHT TKT
-9 V AKST GAMT GIT HADT HNY
-8 U AKDT CIST HAY HNP PST PT
-7 T HAP HNR MST PDT
-6 S CST EAST GALT HAR HNC MDT
-5 R CDT COT EASST ECT EST ET HAC HNE PET
-4 Q AST BOT CLT COST EDT FKT GYT HAE HNA PYT
-3 P ADT ART BRT CLST FKST GFT HAA PMST PYST SRT UYT WGT
-2 O BRST FNT PMDT UYST WGST
-1 N AZOT CVT EGT
0 Z EGST GMT UTC WET WT
1 A CET DFT WAT WEDT WEST
2 B CAT CEDT CEST EET SAST WAST
3 C EAT EEDT EEST IDT MSK
4 D AMT AZT GET GST KUYT MSD MUT RET SAMT SCT
5 E AMST AQTT AZST HMT MAWT MVT PKT TFT TJT TMT UZT YEKT
6 F ALMT BIOT BTT IOT KGT NOVT OMST YEKST
7 G CXT DAVT HOVT ICT KRAT NOVST OMSST THA WIB
8 H ACT AWST BDT BNT CAST HKT IRKT KRAST MYT PHT SGT ULAT WITA WST
9 I AWDT IRKST JST KST PWT TLT WDT WIT YAKT
10 K AEST ChST PGT VLAT YAKST YAPT
11 L AEDT LHDT MAGT NCT PONT SBT VLAST VUT
12 M ANAST ANAT FJT GILT MAGST MHT NZST PETST PETT TVT WFT
13 FJST NZDT
11.5 NFT
10.5 ACDT LHST
9.5 ACST
6.5 CCT MMT
5.75 NPT
5.5 SLT
4.5 AFT IRDT
3.5 IRST
-2.5 HAT NDT
-3.5 HNT NST NT
-4.5 HLV VET
-9.5 MART MIT
"""
_TZ_OFFSETS: dict[str, int] = {"": 0}
for _row in _TZ_TABLE.strip().splitlines():
    _off, *_names = _row.split()
    for _n in _names:
        _TZ_OFFSETS[_n] = int(float(_off) * 60)

_TZ_ABBR = r"[A-Z](?:[A-Z]{2,4})?"
_FIXED_TZ_RE = re.compile(rf"({_TZ_ABBR})?([+-][01]\d(?::?\d{{2}})?)?$")


def _year_alternatives(now_year: int) -> str:
    # fail2ban's %ExY accepts years of "this century from 2001": 20\d\d, plus the
    # next century digits if we are close to it.  A plain superset that keeps
    # the same intent (no 19xx, no 3-digit garbage) is enough here.
    cents = {str(y)[:3] for y in range(2000, now_year + 4)}
    return "(?:" + "|".join(sorted(cents)) + r")\d"


_DIRECTIVES: dict[str, str] = {
    "a": rf"(?P<a>{_alt(_DAYS)})",
    "A": rf"(?P<A>{_alt(_DAYS_FULL)})",
    "b": rf"(?P<b>{_alt(_MONTHS)})",
    "B": rf"(?P<B>{_alt(_MONTHS_FULL)})",
    "d": r"(?P<d>[1-2]\d|[0 ]?[1-9]|3[0-1])",
    "f": r"(?P<f>[0-9]{1,6})",
    "H": r"(?P<H>[0-1]?\d|2[0-3])",
    "I": r"(?P<I>1[0-2]|0[1-9]|[1-9])",
    "j": r"(?P<j>36[0-6]|3[0-5]\d|[12]\d\d|0[1-9]\d|00[1-9]|[1-9]\d|0[1-9]|[1-9])",
    "m": r"(?P<m>0?[1-9]|1[0-2])",
    "M": r"(?P<M>[0-5]?\d)",
    "p": r"(?P<p>am|pm)",
    "S": r"(?P<S>[0-5]?\d|6[0-1])",
    "U": r"(?P<U>5[0-3]|[0-4]\d|\d)",
    "w": r"(?P<w>[0-6])",
    "W": r"(?P<W>5[0-3]|[0-4]\d|\d)",
    "y": r"(?P<y>\d\d)",
    "Y": r"(?P<Y>\d{4})",
    "z": r"(?P<z>Z|UTC|GMT|[+-][01]\d(?::?\d{2})?)",
    "Z": r"(?P<Z>Z|[A-Z]{3,5})",
    "k": r" ?(?P<H>[0-2]?\d)",
    "l": r" ?(?P<I>1?\d)",
    "ExZ": rf"(?P<Z>{_TZ_ABBR})",
    "Exz": rf"(?P<z>(?:{_TZ_ABBR})?[+-][01]\d(?::?\d{{2}})?|{_TZ_ABBR})",
    "Exd": r"(?P<d>[1-2]\d|0[1-9]|3[0-1])",
    "Exm": r"(?P<m>0[1-9]|1[0-2])",
    "ExH": r"(?P<H>[0-1]\d|2[0-3])",
    "Exk": r" ?(?P<H>[0-1]?\d|2[0-3])",
    "Exl": r" ?(?P<I>1[0-2]|\d)",
    "ExM": r"(?P<M>[0-5]\d)",
    "ExS": r"(?P<S>[0-5]\d|6[0-1])",
    "ExY": "(?P<Y>" + _year_alternatives(_dt.date.today().year) + ")",
    "Exy": r"(?P<y>\d{2})",
}
_DIRECTIVE_RE = re.compile(
    "%(%|" + "|".join(sorted((k for k in _DIRECTIVES if len(k) > 1), key=len, reverse=True))
    + "|[a-zA-Z])"
)
_ALPHA_DIRECTIVE_RE = re.compile(r"(?<!%)%[aAbBpc]")

# --- boundaries fail2ban adds around a template --------------------------

_HAS_GROUP_RE = re.compile(r"(?<!\(\?)(?<!\\)\((?!\?)")
_WRAP_GROUP_RE = re.compile(r"^((?:\(\?\w+\))?\^?(?:\(\?\w+\))?)(.*?)(\$?)$")
# fail2ban 1.1: an escaped "\(?i)" is no flag group (1.0.2's "(?!<\\)" was a typo of "(?<!\\)")
_GLOBAL_FLAGS_RE = re.compile(r"((?:^|(?<!\\))\(\?[a-z]+\))")
_NO_WORD_BOUND_BEG = re.compile(r"^\(*(?:\(\?\w+\))?(?:\^|\(*\*\*|\((?:\?:)?\^)")
_NO_WORD_BOUND_END = re.compile(r"(?<!\\)(?:\$\)?|\\b|\\s|\*\*\)*)$")
_DEL_WORD_BOUNDS = re.compile(r"^\(*(?:\(\?\w+\))?\(*\*\*|(?<!\\)\*\*\)*$")
_LINE_BOUND_BEG = re.compile(r"^(?:\(\?\w+\))?(?:\^|\((?:\?:)?\^(?!\|))")
_LINE_BOUND_END = re.compile(r"(?<![\\\|])(?:\$\)?)$")
_EPOCH_TOKEN = re.compile(r"(?<!\\)\{L?EPOCH\}", re.IGNORECASE)
_DATE_TOKEN = re.compile(r"(?<!\\)\{DATE\}", re.IGNORECASE)
_UNBOUND_PREFIX = re.compile(r"^\{UNB\}")
_LN_BEG_PREFIX = re.compile(r"^\{\^LN-BEG\}")
_ANCHOR_BEG_SUFFIX = re.compile(r"^\((?:\?:)?\^\|\\b\|\\W\)")
_ANCHOR_END_SUFFIX = re.compile(r"\(\?=\\b\|\\W\|\$\)$")

LINE_BEGIN = 8
LINE_END = 4
WORD_BEGIN = 2
WORD_END = 1

DateParser = Callable[["re.Match[str]", float, "int | None"], "float | None"]


class DateTemplate:
    """One way to find a date in a line: a compiled regex plus its parser."""

    __slots__ = ("_group", "_long", "flags", "kind", "name", "pattern", "regex", "weight")

    def __init__(self, name: str, kind: str, pattern: str | None = None) -> None:
        self.name = name
        self.kind = kind  # "pattern" | "epoch" | "tai64n"
        self.pattern = pattern  # the %-pattern for "pattern" templates
        self.flags = 0
        self.weight = 1.0
        self.regex: re.Pattern[str] = re.compile("")
        self._group = 1
        self._long = False

    @property
    def anchored(self) -> bool:
        return bool(self.flags & (LINE_BEGIN | LINE_END))

    def _set_regex(self, regex: str, word_begin: bool | str = True, word_end: bool = True) -> None:
        """Add fail2ban's implicit boundaries, then compile."""
        regex = regex.strip()
        gflags = _GLOBAL_FLAGS_RE.search(regex)
        if gflags:
            regex = _GLOBAL_FLAGS_RE.sub("", regex, count=1)
        bound_begin = bool(word_begin) and not _NO_WORD_BOUND_BEG.search(regex)
        bound_end = word_end and not _NO_WORD_BOUND_END.search(regex)
        if not _HAS_GROUP_RE.search(regex):
            # the date is always group 1: it is what gets cut out of the line
            regex = _WRAP_GROUP_RE.sub(r"\1(\2)\3", regex)
        self.flags = 0
        if bound_begin:
            if word_begin != "start":
                self.flags |= WORD_BEGIN
                regex = r"(?=^|\b|\W)" + regex
            else:
                self.flags |= LINE_BEGIN
                # a few non-word characters may precede the date ("[", "<")
                regex = r"^(?:\W{0,2})?" + regex
                if not self.name.startswith("{^LN-BEG}"):
                    self.name = "{^LN-BEG}" + self.name
        if bound_end:
            self.flags |= WORD_END
            regex += r"(?=\b|\W|$)"
        if not (self.flags & LINE_BEGIN) and _LINE_BOUND_BEG.search(regex):
            self.flags |= LINE_BEGIN
        if not (self.flags & LINE_END) and _LINE_BOUND_END.search(regex):
            self.flags |= LINE_END
        regex = _DEL_WORD_BOUNDS.sub(lambda m: m.group().replace("**", ""), regex)
        if gflags:
            regex = gflags.group(1) + regex
        try:
            self.regex = re.compile(regex)
        except re.error as exc:
            raise DatePatternError(f"date pattern {self.name!r} is not a valid regex: {exc}") from exc

    # -- constructors --------------------------------------------------

    @classmethod
    def from_pattern(cls, pattern: str, word_begin: bool | str = True, word_end: bool = True) -> DateTemplate:
        tpl = cls(pattern, "pattern", pattern)
        if _UNBOUND_PREFIX.search(pattern):
            pattern = _UNBOUND_PREFIX.sub("", pattern)
            word_begin = word_end = False
        if word_begin and _LN_BEG_PREFIX.search(pattern):
            pattern = _LN_BEG_PREFIX.sub("", pattern)
            word_begin = "start"

        def directive(m: re.Match[str]) -> str:
            key = m.group(1)
            if key == "%":
                return "%"
            try:
                return _DIRECTIVES[key]
            except KeyError:
                raise DatePatternError(
                    f"unsupported date directive %{key} in datepattern {tpl.pattern!r} "
                    "(write a literal percent sign as %%)"
                ) from None

        regex = _DIRECTIVE_RE.sub(directive, pattern)
        # a lone "%" not followed by a known directive letter
        if re.search(r"%(?![%a-zA-Z])", pattern.replace("%%", "")):
            raise DatePatternError(f"stray '%' in datepattern {pattern!r} (use %% for a literal '%')")
        if _ALPHA_DIRECTIVE_RE.search(pattern):
            regex = "(?iu)" + regex
        tpl.name = _DIRECTIVE_RE.sub(lambda m: "%" + m.group(1), pattern)
        if word_begin == "start" and not tpl.name.startswith("{^LN-BEG}"):
            tpl.name = "{^LN-BEG}" + tpl.name
        tpl._set_regex(regex, word_begin, word_end)
        return tpl

    @classmethod
    def epoch(cls, *, line_begin_only: bool = False, pattern: str | None = None,
              long_form: bool = False) -> DateTemplate:
        name = pattern or ("LongEpoch" if long_form else "Epoch")
        tpl = cls(name, "epoch")
        tpl._long = long_form
        epoch_re = r"\d{10,11}\b(?:\.\d{3,6})?"
        if long_form:
            # milli- and microsecond epochs (13 or 16 digits), optional fraction
            epoch_re = r"\d{10,11}(?:\d{3}(?:\.\d{1,6}|\d{3})?)?"
        if pattern:
            tpl._group = 2
            regex = _EPOCH_TOKEN.sub(lambda _m: f"({epoch_re})", pattern)
            if not _HAS_GROUP_RE.search(pattern):
                # fail2ban 1.1: the whole match is cut out only when the pattern has no
                # group of its own; "^type=\S+ msg=audit\(({EPOCH})" cuts the epoch alone
                regex = "(" + regex + ")"
            tpl._set_regex(regex)
        elif not line_begin_only:
            # at line start, inside "[...]" at line start, or SELinux "audit(...:"
            tpl._set_regex(
                r"((?:^|(?P<square>(?<=^\[))|(?P<selinux>(?<=\baudit\()))"
                + epoch_re
                + r")(?:(?(selinux)(?=:\d+\)))|(?(square)(?=\])))",
                word_begin=False,
            )
        else:
            tpl._set_regex(
                r"((?P<square>(?<=^\[))?" + epoch_re + r")(?(square)(?=\]))",
                word_begin="start",
                word_end=True,
            )
        return tpl

    @classmethod
    def tai64n(cls, *, word_begin: bool | str = False) -> DateTemplate:
        tpl = cls("TAI64N", "tai64n")
        tpl._set_regex("@[0-9a-f]{24}", word_begin=word_begin)
        return tpl

    # -- parsing -------------------------------------------------------

    def parse(self, m: re.Match[str], now: float, default_tz: int | None) -> float | None:
        """Epoch seconds of the date matched by ``m``; None if it is not a real date."""
        if self.kind == "epoch":
            text = m.group(self._group)
            if self._long and len(text) >= 13:
                if len(text) >= 16 and "." not in text:
                    return float(text) / 1_000_000
                return float(text) / 1000
            return float(text)
        if self.kind == "tai64n":
            return float(int(m.group(1)[2:17], 16))
        return groups_to_time(m.groupdict(), now, default_tz)


def parse_tz_offset(tz: str) -> int:
    """Minutes east of UTC for "UTC", "+0200", "CET+1", "Z", ... (fixed offsets only)."""
    tz = tz.strip()
    if tz in ("Z", "UTC", "GMT"):
        return 0
    m = _FIXED_TZ_RE.match(tz)
    if m is None or not tz:
        raise DatePatternError(f"unknown or unsupported time zone {tz!r} (use an offset like +0200)")
    abbr, off = m.groups()
    return _zone_offset(abbr or "", off or "")


def _zone_offset(abbr: str, off: str) -> int:
    try:
        base = _TZ_OFFSETS[abbr]
    except KeyError:
        raise ValueError(f"unknown time zone abbreviation {abbr!r}") from None
    if not off:
        return base
    sign = -1 if off[0] == "-" else 1
    if len(off) <= 3:
        return base + int(off) * 60
    digits = off[1:].replace(":", "")
    return base + sign * (int(digits[0:2]) * 60 + int(digits[2:4] or 0))


def _tz_value_offset(val: str) -> int:
    if val in ("Z", "UTC", "GMT"):
        return 0
    m = _FIXED_TZ_RE.match(val)
    if m is None:
        raise ValueError(f"bad time zone {val!r}")
    abbr, off = m.groups()
    return _zone_offset(abbr or "", off or "")


def groups_to_time(g: dict[str, str | None], now: float, default_tz: int | None) -> float | None:
    """Turn strptime-like named groups into epoch seconds (fail2ban's rules).

    Missing year: this year, or last year if that would put the date more than
    a day in the future.  Missing month and day: today, or yesterday if the
    time is still to come.  Raises ValueError for impossible dates.
    """
    year = month = day = tzoffset = weekday = julian = week = None
    week_starts_sunday = False
    hour = minute = second = 0
    for key, val in g.items():
        if val is None:
            continue
        if key == "y":
            year = int(val)
            if year <= 2000:
                year += 2000
        elif key == "Y":
            year = int(val)
        elif key == "m":
            month = int(val)
        elif key == "B":
            month = _MONTHS_FULL.index(val.lower()) + 1
        elif key == "b":
            month = _MONTHS.index(val.lower()) + 1
        elif key == "d":
            day = int(val)
        elif key == "H":
            hour = int(val)
        elif key == "I":
            hour = int(val)
            ampm = (g.get("p") or "").lower()
            if ampm in ("", "am"):
                if hour == 12:
                    hour = 0
            elif ampm == "pm" and hour != 12:
                hour += 12
        elif key == "M":
            minute = int(val)
        elif key == "S":
            second = int(val)
        elif key == "A":
            weekday = _DAYS_FULL.index(val.lower())
        elif key == "a":
            weekday = _DAYS.index(val.lower())
        elif key == "w":
            weekday = (int(val) - 1) % 7
        elif key == "j":
            julian = int(val)
        elif key in ("U", "W"):
            week = int(val)
            week_starts_sunday = key == "U"
        elif key in ("z", "Z"):
            tzoffset = _tz_value_offset(val)
    if second >= 60:
        # leap seconds (":60"/":61") are accepted by the pattern; fold them
        second = 59
    now_dt = _dt.datetime.fromtimestamp(now)
    assume_year = year is None
    if year is None:
        year = now_dt.year
    if month is None or day is None:
        if julian is None and week is not None and weekday is not None:
            first = _dt.date(year, 1, 1).weekday()
            if week_starts_sunday:
                first = (first + 1) % 7
                weekday = (weekday + 1) % 7
            week_0_len = (7 - first) % 7
            julian = 1 + weekday if week == 0 else 1 + week_0_len + (week - 1) * 7 + weekday
        if julian is not None:
            d = _dt.date.fromordinal(_dt.date(year, 1, 1).toordinal() + julian - 1)
            year, month, day = d.year, d.month, d.day
    assume_today = False
    if month is None and day is None:
        month, day = now_dt.month, now_dt.day
        assume_today = True
    if month is None or day is None:
        return None
    result = _dt.datetime(year, month, day, hour, minute, second)
    if tzoffset is None and default_tz is not None:
        tzoffset = default_tz
    if tzoffset is not None:
        result -= _dt.timedelta(minutes=tzoffset)
    if assume_today and result > now_dt:
        result -= _dt.timedelta(days=1)
    if assume_year and result > now_dt + _dt.timedelta(days=1):
        result = result.replace(year=year - 1, month=month, day=day)
    if tzoffset is not None:
        return float(calendar.timegm(result.utctimetuple()))
    return time.mktime(result.timetuple())


# --- the default template list -----------------------------------------

_DEFAULT_PATTERNS = (
    # ISO 8601 / simple dates: 2005-01-23T21:59:59.981746, 2005/01/23 21:59:59
    r"%ExY(?P<_sep>[-/.])%m(?P=_sep)%d(?:T|  ?)%H:%M:%S(?:[.,]%f)?(?:\s*%z)?",
    # asctime with optional weekday, fraction and/or year
    r"(?:%a )?%b %d %k:%M:%S(?:\.%f)?(?: %ExY)?",
    r"(?:%a )?%b %d %ExY %k:%M:%S(?:\.%f)?",
    r"%d(?P<_sep>[-/])%m(?P=_sep)(?:%ExY|%Exy) %k:%M:%S",
    # Apache [31/Oct/2006:09:22:55 -0000], 26-Jul-2007 15:20:52.252
    r"%d(?P<_sep>[-/])%b(?P=_sep)%ExY[ :]?%H:%M:%S(?:\.%f)?(?: %z)?",
    r"%m/%d/%ExY:%H:%M:%S",
    r"%m-%d-%ExY %k:%M:%S(?:\.%f)?",
    "EPOCH",
    r"{^LN-BEG}%H:%M:%S",
    r"^<%m/%d/%Exy@%H:%M:%S>",
    r"%Exy%Exm%Exd  ?%H:%M:%S",
    r"%b %d, %ExY %I:%M:%S %p",
    r"^%b-%d-%Exy %k:%M:%S",
    # 20050123T215959, 20050123 215959, and since fail2ban 1.1 xrdp's 20050123-21:59:59
    r"%ExY%Exm%Exd(?:-|T|  ?)%ExH:?%ExM:?%ExS(?:[.,]%f)?(?:\s*%z)?",
    r"(?:%Z )?(?:%a )?%b %d %k:%M:%S(?:\.%f)?(?: %ExY)?",
    r"(?:%z )?(?:%a )?%b %d %k:%M:%S(?:\.%f)?(?: %ExY)?",
    "TAI64N",
)


def _template_for(pattern: str) -> DateTemplate:
    key = pattern if "%" in pattern else pattern.upper()
    if "EPOCH" in key:
        if _EPOCH_TOKEN.search(pattern):
            return DateTemplate.epoch(pattern=pattern, long_form="LEPOCH" in key)
        if key in ("EPOCH", "{^LN-BEG}EPOCH", "^EPOCH"):
            return DateTemplate.epoch(line_begin_only=key != "EPOCH")
        if key in ("LEPOCH", "{^LN-BEG}LEPOCH", "^LEPOCH"):
            return DateTemplate.epoch(line_begin_only=key != "LEPOCH", long_form=True)
    if key in ("TAI64N", "{^LN-BEG}TAI64N", "^TAI64N"):
        return DateTemplate.tai64n(word_begin="start" if key != "TAI64N" else False)
    return DateTemplate.from_pattern(pattern)


def _unbound(pattern: str) -> str:
    pattern = _UNBOUND_PREFIX.sub("", pattern)
    pattern = _LN_BEG_PREFIX.sub("", pattern)
    pattern = _ANCHOR_BEG_SUFFIX.sub("", pattern)
    return _ANCHOR_END_SUFFIX.sub("", pattern)


_DEFAULTS: list[DateTemplate] | None = None
_DEFAULTS_WITH_ANCHORED: list[DateTemplate] | None = None


def _default_templates() -> tuple[list[DateTemplate], list[DateTemplate]]:
    """(plain defaults, defaults preceded by their line-anchored variants)."""
    global _DEFAULTS, _DEFAULTS_WITH_ANCHORED
    if _DEFAULTS is None or _DEFAULTS_WITH_ANCHORED is None:
        plain = [_template_for(p) for p in _DEFAULT_PATTERNS]
        anchored: list[DateTemplate] = []
        for tpl in plain:
            if tpl.name.startswith("{^LN-BEG}") or tpl.name.startswith("^"):
                continue
            # a date at the start of the line is far more likely than one in the
            # message body; fail2ban tries those variants first
            src = tpl.pattern if tpl.kind == "pattern" else tpl.name
            assert src is not None
            a = _template_for("{^LN-BEG}" + src)
            if a.name != tpl.name:
                a.weight = 100.0
                anchored.append(a)
        _DEFAULTS = plain
        _DEFAULTS_WITH_ANCHORED = anchored + plain
    return _DEFAULTS, _DEFAULTS_WITH_ANCHORED


_MISSING = object()


class DateDetector:
    """Finds the date in a line using an ordered list of templates.

    Stateful like fail2ban's: it remembers the template and position that
    worked last, which both speeds up the common case (one log = one format)
    and decides between several templates matching the same line.
    """

    def __init__(self, patterns: str | Iterable[str] | None = None, *,
                 default_tz: int | None = None) -> None:
        self.templates: list[DateTemplate] = []
        self._names: set[str] = set()
        self.default_tz = default_tz
        self.none = False  # {NONE}: never look for a date
        if patterns is None:
            self._add_defaults()
        else:
            if isinstance(patterns, str):
                patterns = [p.strip() for p in re.split("\n+", patterns)]
            for p in patterns:
                if p:
                    self.add(p)
            if not self.templates and not self.none:
                self._add_defaults()
        self._last: DateTemplate | None = None
        self._last_pos = 1
        self._distance: dict[int, int] = {}
        self._cache: dict[tuple[int, str, int], float | None] = {}

    @property
    def words_survive_cut(self) -> bool:
        """True if cutting a found date out of a line can never glue two words
        into one (so words of the rest can be looked for in the whole line).

        Every bounded template guarantees a non-word character (or the line's
        edge) on at least one side of the date; only {UNB} / ``**`` patterns
        bounded on neither side could sit between two letters.
        """
        return all(t.flags for t in self.templates)

    def _append(self, tpl: DateTemplate, ignore_dup: bool = False) -> None:
        if tpl.name in self._names:
            if ignore_dup:
                return
            raise DatePatternError(f"date pattern {tpl.name!r} given twice")
        self._names.add(tpl.name)
        self.templates.append(tpl)

    def _add_defaults(self, only_line_begin: bool = False, pre_match: str | None = None) -> None:
        ignore_dup = bool(self.templates)
        plain, full = _default_templates()
        for tpl in (full if pre_match is None else plain):
            if only_line_begin and not (tpl.flags & LINE_BEGIN):
                continue
            if pre_match is not None:
                if tpl.kind != "pattern":
                    continue  # {DATE} can only embed %-pattern templates
                assert tpl.pattern is not None
                inner = _unbound(tpl.pattern)
                tpl = _template_for(_DATE_TOKEN.sub(lambda _m, s=inner: s, pre_match))  # type: ignore[misc]
            self._append(tpl, ignore_dup=ignore_dup)

    def add(self, pattern: str) -> None:
        key = pattern if "%" in pattern else pattern.upper()
        if key in ("{^LN-BEG}", "{DEFAULT}"):
            self._add_defaults(only_line_begin=key == "{^LN-BEG}")
        elif "{DATE}" in key:
            self._add_defaults(pre_match=pattern)
        elif key == "{NONE}":
            self.none = True
        else:
            self._append(_template_for(pattern))

    def match(self, line: str) -> tuple[re.Match[str] | None, DateTemplate | None]:
        """The winning template's match on ``line`` (the date is group 1)."""
        if self.none:
            return None, None
        last = self._last
        if last is not None:
            m = last.regex.search(line)
            if m is not None and (last.anchored or m.start() == self._last_pos
                                  or len(self.templates) == 1):
                return m, last
        best: tuple[re.Match[str], DateTemplate] | None = None
        n = len(self.templates)
        winner: tuple[re.Match[str], DateTemplate] | None = None
        for i, tpl in enumerate(self.templates):
            m = tpl.regex.search(line)
            if m is None:
                continue
            dist = m.start()
            if i + 1 >= n or tpl.anchored:
                winner = (m, tpl)
                break
            # a date further into the line than where dates used to be may be a
            # date quoted in the message: keep looking for one nearer the start
            if dist > self._distance.get(id(tpl), 0x7FFFFFFF) or dist > self._last_pos:
                if best is None or dist < best[0].start():
                    best = (m, tpl)
                continue
            winner = (m, tpl)
            break
        if winner is None:
            winner = best
        if winner is None:
            return None, None
        m, tpl = winner
        self._last = tpl
        self._last_pos = m.start()
        self._distance[id(tpl)] = m.start()
        return m, tpl

    def parse(self, m: re.Match[str], tpl: DateTemplate, now: float) -> float | None:
        # Busy logs repeat the same second many times; turning a date into
        # epoch seconds (datetime + mktime) is the most expensive step for a
        # matching line, so remember recent results.  The result depends on
        # `now` only through whole seconds (dates are whole seconds and are
        # compared with now), hence the int(now) in the key.
        key = (id(tpl), m.group(0), int(now))
        hit = self._cache.get(key, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        try:
            value: float | None = tpl.parse(m, now, self.default_tz)
        except (ValueError, OverflowError, OSError):
            # impossible calendar dates (Feb 30), years out of range, ...
            value = None
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[key] = value
        return value
