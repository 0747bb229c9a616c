"""fail2ban-compatible filters: read filter.d files unchanged, match log lines.

A filter turns one log line into zero or more :class:`FailMatch` values.  The
semantics follow fail2ban's documented behaviour (and its shipped sample logs,
which the test-suite runs through this engine):

* config: ``[INCLUDES] before/after`` with ``.local`` overlays, ``[DEFAULT]``,
  ``[Init]``, ``[Definition]``, ``%(name)s`` / ``%(section/name)s`` /
  ``%(known/name)s`` interpolation, then ``<tag>`` substitution from
  ``[Init]`` values and jail parameters (``sshd[mode=aggressive]``);
* the date is found first (see :mod:`edgeward.guard.datedetect`) and cut out
  of the line; ``prefregex`` (with ``<F-CONTENT>``) and ``failregex`` are
  searched in the rest, ``ignoreregex`` can veto a match;
* ``<HOST>``/``<ADDR>``/``<IP4>``/``<IP6>``/``<CIDR>``/``<SUBNET>``/``<DNS>``
  and ``<F-...>`` capture tags, ``<F-MLFID>`` connection tracking with
  ``<F-NOFAIL>``/``<F-MLFFORGET>``/``<F-MLFGAINED>``, ``maxlines`` buffers and
  ``<SKIPLINES>``.

edgeward bans addresses only: a failure whose id is a DNS name or some other
non-address (``<F-ID>`` = user name, ...) is counted in :attr:`Filter.stats`
and not returned (set ``raw_hosts`` to get fail2ban's raw ids, as the
compatibility suite does).

Fast path (all exact, checked against every shipped filter and sample log by
tests/unit/guard/test_filter_prefilter.py):

* pre-screen: the words each failregex cannot match without are taken from
  the parsed regexes; a line that lacks the words of every failregex is
  dropped before its date is even searched.  Plain ``str.__contains__``
  tests matched or beat one ``re`` alternation per CPU second and clearly
  beat google-re2 and Hyperscan (a Python call into re2/Hyperscan per line
  costs more than a few ``in`` tests): ~720k vs ~690k, ~290k and ~520k
  prosody lines per CPU-second in bench/jail_lines.py.  Those screens live
  in bench/prefilters.py (they plug in through :meth:`Filter.set_screen`);
  here there are only the word screen and "none".  Where nearly every line
  is a candidate (sshd's log) the screen switches itself off (see
  ``_review_screen``).  :meth:`Filter.process_text` applies it
  to a whole block with ``str.find``, so skipped lines never become strings;
* per regex: all its literal runs must be in the text and its leading
  literal must start it, else the regex is not run; regexes are dispatched
  on the first characters of the text;
* dates: the last working template is tried first and parsed dates are
  cached per second.
Matching itself is Python's ``re``: fail2ban filters rely on its semantics
(back-references, look-arounds, conditionals, ``$`` before the final "\n").

Safety: lines longer than ``max_line_bytes`` (default 64 KiB) are cut there
and counted in ``stats["truncated"]``; matching only ever sees the cut line,
so nothing past the cut can match and a backtracking regex has a bounded
input.  64 KiB is above any real log line (journald's default line max is
48 KiB) and keeps the worst case of a bad regex in milliseconds for sane
patterns.  Python's ``re`` cannot be interrupted and does not release the
GIL, so a catastrophic pattern would still stall the thread running it:
``process`` takes the filter's own lock so callers can run it in a worker
thread off the event loop; a process pool is the only way to *kill* a
runaway match, and filters with nested repetition are flagged in
:attr:`Filter.unsupported`.
"""

from __future__ import annotations

import configparser
import importlib
import ipaddress
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .datedetect import DateDetector, DatePatternError, parse_tz_offset
from .types import DEFAULT_SEARCH_DIRS, EDGEWARD_FILTER_DIR, FailMatch

# The regex parser of the stdlib is how we find required literals.  It is
# private (re._parser since 3.11), hence loaded dynamically and typed as Any;
# if it ever moves, required_literals() returns nothing and the fast path
# is simply off.
try:
    _sre_parse: Any = importlib.import_module("re._parser")
    _sre_c: Any = importlib.import_module("re._constants")
except ImportError:  # pragma: no cover - future Pythons
    _sre_parse = _sre_c = None

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "EDGEWARD_FILTER_DIR",
    "Filter",
    "FilterError",
    "load_filter",
]

# Long enough for any real log line (journald caps at 48 KiB by default), short
# enough that a hostile line costs milliseconds, not seconds, in the regexes.
DEFAULT_MAX_LINE_BYTES = 64 * 1024


class FilterError(ValueError):
    """A filter file or inline regex that edgeward cannot use, with where and why."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line

    def __str__(self) -> str:
        if self.path is None:
            return self.message
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


# --- host and tag regexes (fail2ban's tag vocabulary) --------------------

_IP4 = r"(?:\d{1,3}\.){3}\d{1,3}"
# fail2ban 1.1's IPAddr.IP_6_RE: a lone ":" step also finds "::" (and "::/32")
_IP6 = r"(?:[0-9a-fA-F]{1,4}::?|:){1,7}(?:[0-9a-fA-F]{1,4}|(?<=:):)"
_R_IP4 = rf"(?:::f{{4,6}}:)?(?P<ip4>{_IP4})"
_R_IP6 = rf"(?P<ip6>{_IP6})"
_R_DNS = r"(?P<dns>[\w\-.^_]*\w)"
_R_ADDR = rf"\[?(?:{_R_IP4}|{_R_IP6})\]?"
_R_HOST = rf"(?:{_R_ADDR}|{_R_DNS})"
_R_CIDR = r"(?P<cidr>\d+)"
_R_SUBNET = rf"\[?(?:{_R_IP4}|{_R_IP6})(?:/{_R_CIDR})?\]?"

_STATIC_TAGS = {
    "IP4": _R_IP4, "F-IP4/": _R_IP4,
    "IP6": _R_IP6, "F-IP6/": _R_IP6,
    "ADDR": _R_ADDR, "F-ADDR/": _R_ADDR,
    "CIDR": _R_CIDR, "F-CIDR/": _R_CIDR,
    "SUBNET": _R_SUBNET, "F-SUBNET/": _R_SUBNET,
    "DNS": _R_DNS, "F-DNS/": _R_DNS,
    "F-ID/": r"(?P<fid>\S+)",
    "F-PORT/": r"(?P<fport>\w+)",
}  # fmt: skip
_TAG_RE = re.compile(r"</?[\w\-]+/?>")
_FTAG_NAME_RE = re.compile(r"^(/?)F-([A-Z0-9_\-]+)$")
_TAG_GROUP_MAP = {"id": "fid", "port": "fport"}
_GLOBAL_TO_LOCAL_FLAGS = re.compile(r"(?<!\\)\((?:\?:)?(\(\?[a-z]+)\)")
_COMPLEX_NAME_RE = re.compile(r"^(alt_|tuple_)(.*?)(?:_\d+)?$")
_FAILURE_ID_GROUPS = ("fid", "ip4", "ip6", "dns")
_ID_PRESENT_GROUPS = (*_FAILURE_ID_GROUPS, "mlfid")
# groups that are machinery, not user-facing tags
_INTERNAL_KEYS = frozenset({
    "ip4", "ip6", "dns", "fid", "cidr", "mlfid", "matches", "nofail", "mlfforget",
    "mlfgained", "mlfpending", "content", "users", "nofail-matches", "ip",
})  # fmt: skip


def _resolve_tags(regex: str, use_dns: str = "yes") -> str:
    """Replace fail2ban's <TAGS> by regex groups."""
    opened: set[str] = set()
    skiplines = [0]

    def subst(m: re.Match[str]) -> str:
        tag = m.group()
        name = tag[1:-1]
        if name == "HOST":
            return _R_HOST if use_dns != "no" else _R_ADDR
        if name == "SKIPLINES":
            n = skiplines[0]
            skiplines[0] += 1
            return rf"\n(?P<skiplines{n}>(?:(?:.*\n)*?))"
        static = _STATIC_TAGS.get(name)
        if static is not None:
            return static
        fm = _FTAG_NAME_RE.match(name)
        if fm is None:
            return tag
        closing, fname = fm.groups()
        if closing:
            return ")" if fname in opened else tag
        opened.add(fname)
        low = fname.lower()
        return f"(?P<{_TAG_GROUP_MAP.get(low, low)}>"

    return _TAG_RE.sub(subst, regex)


# --- required-literal extraction (the prefilter) ------------------------

_MIN_LITERAL = 3
_SCREEN_TRIAL = 4096  # lines per review of the pre-screen's skip rate
_KEY = 3  # characters of a regex's leading literal used to dispatch on


def _analyze(items: Any) -> tuple[list[str], list[tuple[str, ...]]]:
    """(required literal runs, alternative sets) of a parsed regex sequence.

    Literal runs at this level (and inside mandatory groups) are required;
    anything optional, repeated, case-insensitive or zero-width ends a run.
    A branch whose every alternative has a required word yields an
    alternative set: one of those words must be present.
    """
    runs: list[str] = []
    altsets: list[tuple[str, ...]] = []
    cur: list[str] = []

    def flush() -> None:
        if cur:
            runs.append("".join(cur))
            cur.clear()

    def walk(seq: Any) -> None:
        for op, av in seq:
            if op is _sre_c.LITERAL:
                cur.append(chr(av))
            elif op is _sre_c.SUBPATTERN:
                _group, add_flags, _del_flags, sub = av
                if add_flags & re.IGNORECASE:
                    flush()
                    continue
                walk(sub)
            elif op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT,
                        getattr(_sre_c, "POSSESSIVE_REPEAT", None)):
                lo, _hi, sub = av
                flush()
                if lo >= 1:
                    walk(sub)
                    flush()
            elif op is getattr(_sre_c, "ATOMIC_GROUP", None):
                walk(av)
            elif op is _sre_c.BRANCH:
                flush()
                alts: list[str] = []
                for alt in av[1]:
                    words = _words(_analyze(alt)[0])
                    if not words:
                        alts = []
                        break
                    alts.append(max(words, key=len))
                if alts:
                    altsets.append(tuple(dict.fromkeys(alts)))
            else:
                # AT, ASSERT(_NOT), IN, ANY, NOT_LITERAL, GROUPREF, ...: the
                # run ends (a lookaround's literals are not in the match)
                flush()

    walk(items)
    flush()
    return runs, altsets


def required_literals(pattern: re.Pattern[str]) -> list[str]:
    """Literal strings that every match of ``pattern`` must contain ([] if unsure)."""
    return _parse_requirements(pattern)[0]


def _parse_requirements(pattern: re.Pattern[str]) -> tuple[list[str], list[tuple[str, ...]]]:
    if _sre_parse is None:
        return [], []
    try:
        parsed = _sre_parse.parse(pattern.pattern, pattern.flags)
        if parsed.state.flags & (re.IGNORECASE | re.VERBOSE):
            return [], []
        runs, altsets = _analyze(parsed)
    except Exception:
        return [], []
    return [r for r in runs if len(r) >= _MIN_LITERAL], altsets


def leading_literal(pattern: re.Pattern[str]) -> str:
    """The literal text a ``^``-anchored, single-line regex must start with ("" if none)."""
    if _sre_parse is None or pattern.flags & (re.MULTILINE | re.IGNORECASE | re.VERBOSE):
        return ""
    try:
        parsed = list(_sre_parse.parse(pattern.pattern, pattern.flags))
    except Exception:
        return ""
    if not parsed or parsed[0] != (_sre_c.AT, _sre_c.AT_BEGINNING):
        return ""
    out: list[str] = []

    def walk(seq: Any) -> bool:
        for op, av in seq:
            if op is _sre_c.LITERAL:
                out.append(chr(av))
            elif op is _sre_c.SUBPATTERN and not av[1] & re.IGNORECASE:
                if not walk(av[3]):
                    return False
            else:
                return False
        return True

    walk(parsed[1:])
    return "".join(out)


def best_literal(pattern: re.Pattern[str]) -> str | None:
    lits = required_literals(pattern)
    return max(lits, key=len) if lits else None


_WORD_TOKEN_RE = re.compile(rf"\w{{{_MIN_LITERAL},}}")


def _words(runs: Sequence[str]) -> list[str]:
    return [w for lit in runs for w in _WORD_TOKEN_RE.findall(lit)]


def line_clauses(pattern: re.Pattern[str]) -> tuple[tuple[str, ...], ...] | None:
    r"""What the *raw* line must contain for ``pattern`` to match, or None.

    The result is a disjunction of clauses; each clause is a tuple of words
    that must all be present (longest first).

    failregexes see the line with its date cut out, so a literal run like
    `` [] "`` may span the cut and not be in the raw line.  A cut inside a
    run of word characters would need word characters on both sides of the
    date, which fail2ban's date boundaries (````/``\W``) rule out; so whole
    words taken from the required literals are safe to look for before the
    date is even searched.  All of them are required (a regex needs all its
    literals), which is what makes "Failed authentication attempt" reject
    "Successful authentication" lines.
    """
    runs, altsets = _parse_requirements(pattern)
    words = sorted(dict.fromkeys(_words(runs)), key=len, reverse=True)
    if words:
        return (tuple(words),)
    if altsets:
        best = max(altsets, key=lambda s: min(len(w) for w in s))
        return tuple((w,) for w in best)
    return None


# --- regex wrappers -------------------------------------------------------

TupleLine = tuple[str, str, str]  # (before date, date, after date)


def _tuple_buf(lines: Sequence[TupleLine]) -> str:
    return "\n".join(t[0] + t[2] for t in lines) + "\n"


@dataclass(slots=True)
class _Origin:
    path: str | None
    line: int | None


class _Regex:
    """A compiled filter regex plus what it needs for multi-line handling."""

    __slots__ = ("alt", "clauses", "literal", "literals", "origin", "pref_shared", "prefix", "regex",
                 "skip_groups", "source", "tag_keys", "tuples")

    def __init__(self, source: str, origin: _Origin, *, multiline: bool = False,
                 use_dns: str = "yes") -> None:
        self.source = source
        self.origin = origin
        expanded = _resolve_tags(source, use_dns)
        if not expanded.strip():
            raise FilterError("empty regex", origin.path, origin.line)
        # fail2ban allows "((?i)...)"; Python 3.11 only takes global flags at
        # the very start, so rewrite them as local "(?i:...)" groups
        expanded = _GLOBAL_TO_LOCAL_FLAGS.sub(r"\1:", expanded)
        try:
            self.regex = re.compile(expanded, re.MULTILINE if multiline else 0)
        except re.error as exc:
            raise FilterError(
                f"invalid regex {source!r}: {exc} (fix the expression; edgeward uses Python re syntax)",
                origin.path, origin.line,
            ) from exc
        except (RecursionError, OverflowError) as exc:
            raise FilterError(f"regex too complex: {source!r}", origin.path, origin.line) from exc
        self.alt: list[tuple[str, str]] = []
        self.tuples: list[tuple[str, str]] = []
        for k in self.regex.groupindex:
            cm = _COMPLEX_NAME_RE.match(k)
            if cm:
                target = _TAG_GROUP_MAP.get(cm.group(2), cm.group(2))
                (self.alt if cm.group(1) == "alt_" else self.tuples).append((k, target))
        self.alt.sort()
        self.tuples.sort()
        self.skip_groups = sorted(g for g in self.regex.groupindex if g.startswith("skiplines"))
        # every literal run the regex cannot match without, longest first: the
        # regex only runs on text that contains them all (exact: same text)
        self.literals = tuple(sorted(dict.fromkeys(required_literals(self.regex)), key=len, reverse=True))
        self.literal = self.literals[0] if self.literals else None
        # "^Failed " and the like: a startswith() test rejects most lines at once
        self.prefix = leading_literal(self.regex)
        self.clauses = line_clauses(self.regex)
        # user-facing captures (<F-USER> -> "user", ...): everything but machinery
        self.tag_keys = tuple(
            k for k in (*self.regex.groupindex, *(n for _k, n in self.alt))
            if k not in _INTERNAL_KEYS and not k.startswith(("skiplines", "alt_", "tuple_", "_"))
        )
        # captures this regex shares with the filter's prefregex (set by Filter)
        self.pref_shared: tuple[str, ...] = ()

    def keys(self) -> set[str]:
        """Every name `groups()` can return."""
        return {*self.regex.groupindex, *(n for _k, n in self.alt), *(n for _k, n in self.tuples)}

    def groups(self, m: re.Match[str]) -> dict[str, Any]:
        fail: dict[str, Any] = m.groupdict()
        for k, n in self.alt:
            v = fail.get(k)
            if v and not fail.get(n):
                fail[n] = v
        for k, n in self.tuples:
            v = fail.get(k)
            t = fail.get(n)
            fail[n] = (*t, v) if isinstance(t, tuple) else (t, v)
        return fail

    def split_lines(self, m: re.Match[str], lines: list[TupleLine]
                    ) -> tuple[list[TupleLine], list[TupleLine]]:
        """(matched lines, unmatched lines) of a multi-line buffer."""
        if len(lines) <= 1:
            return list(lines), []
        s = m.string
        start = s.rfind("\n", 0, m.start() + 1) + 1
        end = s.find("\n", max(m.end() - 1, 0))
        end = len(s) if end < 0 else end + 1
        c1 = s.count("\n", 0, start)
        c2 = s.count("\n", 0, end)
        matched = list(lines[c1:c2])
        unmatched = list(lines[:c1])
        skipped: list[str] = []
        for g in self.skip_groups:
            v = m.group(g)
            if v:
                skipped.extend(v.splitlines())
        n = 0
        for sk in skipped:
            for i, t in enumerate(matched[n:]):
                if t[0] + t[2] == sk:
                    unmatched.append(matched.pop(n + i))
                    n += i
                    break
        unmatched.extend(lines[c2:])
        return matched, unmatched


# --- config reading --------------------------------------------------------

_CONDITIONAL_RE = re.compile(r"^(\w+)(\?.+)$")
_SECTION_OPT_RE = re.compile(r"^([\w\-]+)/([^\s>]+)$")
_INTERP_RE = re.compile(r"%\(([^)]*)\)s|%%|%")
_ANGLE_TAG_RE = re.compile(r"<([^ <>]+)>")
_FILTER_OPTS = ("usedns", "prefregex", "ignoreregex", "failregex", "maxlines", "datepattern",
                "journalmatch")
_MAX_TAG_REPLACE = 25


@dataclass
class IniConf:
    """Merged sections of a filter file and its includes (or of jail files), with provenance."""

    defaults: dict[str, str] = field(default_factory=dict)
    sections: dict[str, dict[str, str]] = field(default_factory=dict)
    origin: dict[tuple[str, str], tuple[str, list[int]]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def _option_lines(text: str) -> dict[tuple[str, str], list[int]]:
    """Where each option's value lines are, for errors that name file:line.

    Positive numbers are lines that carry part of the value; an option whose
    value starts on the next line is recorded as -(its own line) first.
    """
    out: dict[tuple[str, str], list[int]] = {}
    section = ""
    cur: list[int] | None = None
    for no, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if raw[0] in " \t":
            if cur is not None:
                cur.append(no)
            continue
        sm = re.match(r"^\[([^\]]+)\]", raw)
        if sm:
            section = sm.group(1)
            cur = None
            continue
        om = re.match(r"^([^=:]+?)\s*[=:]", raw)
        if om:
            key = om.group(1).strip().lower()
            cur = [no] if raw[om.end():].strip() else [-no]
            out[(section, key)] = cur
    return out


def _read_one(path: str) -> tuple[configparser.RawConfigParser, dict[tuple[str, str], list[int]]] | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise FilterError(f"filter file is not UTF-8 ({exc.reason} at byte {exc.start})", path) from exc
    except OSError as exc:
        raise FilterError(f"cannot read filter file: {exc.strerror}", path) from exc
    cp = configparser.RawConfigParser(inline_comment_prefixes=(";",), strict=True,
                                      default_section="DEFAULT")
    try:
        cp.read_string(text, source=path)
    except configparser.DuplicateOptionError as exc:
        raise FilterError(f"option {exc.option!r} given twice in [{exc.section}]", path, exc.lineno) from exc
    except configparser.DuplicateSectionError as exc:
        raise FilterError(f"section [{exc.section}] given twice", path, exc.lineno) from exc
    except configparser.ParsingError as exc:
        lineno = exc.errors[0][0] if exc.errors else None
        raise FilterError("not an INI line (expected 'name = value' or '[section]')", path, lineno) from exc
    except configparser.MissingSectionHeaderError as exc:
        raise FilterError("text before the first [section] header", path, exc.lineno) from exc
    except configparser.Error as exc:
        raise FilterError(f"cannot parse filter file: {exc}", path) from exc
    return cp, _option_lines(text)


def include_chain(path: str, seen: tuple[str, ...] = ()) -> list[str]:
    """[before-includes..., path, after-includes...] with .local overlays, recursively."""
    out: list[str] = []
    for p in _with_local([path]):
        parsed = _read_one(p)
        if parsed is None:
            continue
        cp, _ = parsed
        before: list[str] = []
        after: list[str] = []
        if cp.has_section("INCLUDES"):
            for opt, bucket in (("before", before), ("after", after)):
                if cp.has_option("INCLUDES", opt):
                    for inc in cp.get("INCLUDES", opt).split("\n"):
                        inc = inc.strip()
                        if not inc:
                            continue
                        r = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(p), inc)
                        if r in seen or r == p:
                            continue
                        bucket.extend(include_chain(r, (*seen, p)))
        out.extend(before)
        out.append(p)
        out.extend(after)
    return out


def _with_local(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        out.append(p)
        local = os.path.splitext(p)[0] + ".local"
        if local not in paths and os.path.isfile(local):
            out.append(local)
    return out


def _read_conf(path: str) -> IniConf:
    return read_ini(include_chain(path))


def read_ini(files: Sequence[str]) -> IniConf:
    """fail2ban's config files, read in this order into one view (later files override)."""
    conf = IniConf()
    for p in files:
        parsed = _read_one(p)
        if parsed is None:
            continue
        cp, lines = parsed
        conf.files.append(p)
        for k, v in cp.defaults().items():
            conf.defaults[k] = v
            conf.origin[("DEFAULT", k)] = (p, lines.get(("DEFAULT", k), []))
        for sec in cp.sections():
            own = dict(cp._sections[sec])  # type: ignore[attr-defined]
            name = sec
            cm = _CONDITIONAL_RE.match(sec)
            if cm:
                name, cond = cm.groups()
                own = {k + cond: v for k, v in own.items()}
            existing = conf.sections.get(name)
            if existing is not None:
                known = conf.sections.setdefault("KNOWN/" + name, {})
                known.update({k: v for k, v in existing.items() if k in own})
                existing.update(own)
            else:
                conf.sections[name] = dict(own)
            for k in own:
                conf.origin[(name, k)] = (p, lines.get((sec, k), []))
    return conf


class Resolver:
    """fail2ban's two interpolation layers: %(name)s, then <tag>."""

    def __init__(self, conf: IniConf, params: Mapping[str, str]) -> None:
        self.conf = conf
        self.params = {k.lower(): v for k, v in params.items()}
        self._cache: dict[str, str | None] = {}

    def _lookup(self, section: str, name: str, vars_: Mapping[str, str]) -> str | None:
        if name in vars_:
            return vars_[name]
        sec = self.conf.sections.get(section, {})
        if name in sec:
            return sec[name]
        if name in self.conf.defaults:
            return self.conf.defaults[name]
        if name == "__name__":
            return section
        if "/" in name:
            sname, _, opt = name.rpartition("/")
            low = sname.lower()
            if low == "known":
                v = self.conf.sections.get("KNOWN/" + section, {}).get(opt)
                return v if v is not None else self.conf.defaults.get(opt)
            if low == "default":
                return self.conf.defaults.get(opt)
            for real in self.conf.sections:  # names were lower-cased with the option
                if real.lower() == low and not real.startswith("KNOWN/"):
                    v = self.conf.sections[real].get(opt)
                    return v if v is not None else self.conf.defaults.get(opt)
        return None

    def interpolate(self, section: str, value: str, vars_: Mapping[str, str], depth: int = 0) -> str:
        if "%" not in value:
            return value
        if depth > 10:
            raise FilterError(f"interpolation too deep in [{section}] (a %(...)s loop?)")

        def sub(m: re.Match[str]) -> str:
            tok = m.group()
            if tok == "%%":
                return "%"
            if tok == "%":
                raise FilterError(
                    f"'%' must be followed by '%' or '(' in [{section}] value {value!r} "
                    "(write a literal percent sign as %%)"
                )
            name = m.group(1).lower()
            v = self._lookup(section, name, vars_)
            if v is None:
                raise FilterError(f"[{section}] refers to %({m.group(1)})s, which is not defined")
            return self.interpolate(section, v, vars_, depth + 1)

        return _INTERP_RE.sub(sub, value)

    def get(self, section: str, name: str, vars_: Mapping[str, str] | None = None) -> str | None:
        vars_ = self.params if vars_ is None else vars_
        name = name.lower()
        v: str | None
        if name in vars_:
            v = vars_[name]
        else:
            sec = self.conf.sections.get(section)
            if sec is None:
                return None
            v = sec.get(name, self.conf.defaults.get(name))
        if v is None:
            return None
        return self.interpolate(section, v, vars_)

    def get_ex(self, section: str, name: str) -> str | None:
        """Like get(), plus "section/option" names (as used in <lt_file/...> tags)."""
        if name in self._cache:
            return self._cache[name]
        v: str | None = None
        sm = _SECTION_OPT_RE.search(name) if "/" in name else None
        if sm:
            sec, opt = sm.group(1), sm.group(2)
            low = sec.lower()
            cands = ("KNOWN/" + section, section) if low == "known" else (
                (sec,) if low != "default" else ("DEFAULT",))
            for c in cands:
                if c == "DEFAULT":
                    raw = self.conf.defaults.get(opt.lower())
                    if raw is not None:
                        v = self.interpolate(section, raw, {})
                        break
                    continue
                if c in self.conf.sections:
                    raw = self.conf.sections[c].get(opt.lower(), self.conf.defaults.get(opt.lower()))
                    if raw is not None:
                        v = self.interpolate(c, raw, {})
                        break
        if v is None:
            v = self.get(section, name)
        self._cache[name] = v
        return v


def _substitute_tags(tags: dict[str, str], addrepl: Callable[[str], str | None]) -> dict[str, str]:
    """Replace <name> inside values by other values, recursively (fail2ban's rules)."""
    tags = dict(tags)
    done: set[str] = set()
    counts: dict[str, dict[str, int]] = {}
    while True:
        again = False
        for tag in list(tags):
            if tag in done:
                continue
            value = orig = tags[tag]
            m = _ANGLE_TAG_RE.search(value)
            rplc = counts.get(tag, {})
            while m:
                rtag = m.group(1)
                if rtag == tag or rplc.get(rtag, 1) > _MAX_TAG_REPLACE:
                    raise FilterError(f"option {tag!r} refers to itself through <{rtag}>")
                repl = tags.get(rtag)
                if repl is None:
                    repl = addrepl(rtag)
                if repl is None:
                    m = _ANGLE_TAG_RE.search(value, m.end())
                    continue
                value = value.replace(f"<{rtag}>", repl)
                rplc[rtag] = rplc.get(rtag, 0) + 1
                m = _ANGLE_TAG_RE.search(value, m.start())
            if value != orig:
                if _ANGLE_TAG_RE.search(value):
                    counts[tag] = rplc
                    again = True
                tags[tag] = value
            if "<" not in value:
                done.add(tag)
        if not again:
            return tags


def _parse_name_params(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``sshd[mode=aggressive, port="22"]`` into name and parameters."""
    m = re.match(r"^\s*([^\[]+?)\s*(?:\[(.*)\])?\s*$", spec, re.S)
    if not m or m.group(2) is None:
        return spec, {}
    params: dict[str, str] = {}
    for pm in re.finditer(r"""\s*([\w\-_.]+)\s*=\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^,]*)\s*(?:,|$)""",
                          m.group(2)):
        v = pm.group(2).strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
            v = v[1:-1]
        params[pm.group(1)] = v
    return m.group(1), params


def _find_filter_file(name: str, search_dirs: Sequence[str]) -> str:
    if os.sep in name or name.endswith((".conf", ".local")):
        if os.path.isfile(name):
            return name
        base = os.path.splitext(name)[0]
        if os.path.isfile(base + ".local"):
            return base + ".conf"
        raise FilterError(f"filter file not found: {name}", name)
    for d in search_dirs:
        for ext in (".conf", ".local"):
            p = os.path.join(d, name + ext)
            if os.path.isfile(p):
                return os.path.join(d, name + ".conf")
    raise FilterError(
        f"no filter named {name!r} in {', '.join(search_dirs) or '(no directories)'} "
        "(give a path, or add the directory to the filter search path)"
    )


def load_filter(name_or_path: str, *, search_dirs: Sequence[str] = DEFAULT_SEARCH_DIRS,
                params: Mapping[str, str] | None = None,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                default_tz: str | None = None) -> Filter:
    """Read a fail2ban filter (``sshd``, ``sshd[mode=aggressive]`` or a path).

    ``params`` override ``[Init]`` values like a jail's ``filter = name[k=v]``;
    ``default_tz`` ("UTC", "+0200", ...) is fail2ban's jail ``logtimezone``:
    the zone of dates that carry none (default: the process' local zone).
    Raises :class:`FilterError` (with file and line where known) for anything
    it cannot use.
    """
    name, inline_params = _parse_name_params(name_or_path)
    merged = {**inline_params, **(params or {})}
    path = _find_filter_file(name, search_dirs)
    conf = _read_conf(path)
    if not conf.files:
        raise FilterError("filter file not found", path)
    if "Definition" not in conf.sections:
        raise FilterError("no [Definition] section (is this a fail2ban filter file?)", path)
    res = Resolver(conf, merged)
    p_opts = res.params
    opts: dict[str, str] = {}
    try:
        for opt in _FILTER_OPTS:
            if opt in p_opts:
                continue
            v = res.get("Definition", opt)
            if v is not None:
                opts[opt] = v
        init: dict[str, str] = dict(p_opts)
        for opt in conf.sections.get("Init", {}):
            if opt == "__name__" or _CONDITIONAL_RE.match(opt):
                continue
            v = res.get("Init", opt, {})
            if v is None:
                continue
            if not opt.startswith("known/"):
                init["known/" + opt] = v
            init.setdefault(opt, v)
        combined = {**opts, **init}
        final = _substitute_tags(combined, lambda t: res.get_ex("Definition", t))
    except FilterError as exc:
        if exc.path is None:
            exc.path = path
        raise

    def origin(opt: str) -> tuple[str, list[int]]:
        return conf.origin.get(("Definition", opt), conf.origin.get(("DEFAULT", opt), (path, [])))

    def regex_list(opt: str) -> list[tuple[str, _Origin]]:
        value = final.get(opt)
        if value is None:
            return []
        src, lines = origin(opt)
        items = [r for r in value.split("\n") if r != ""]
        raw_items = [r for r in (conf.sections.get("Definition", {}).get(opt) or "").split("\n") if r.strip()]
        out = []
        first = abs(lines[0]) if lines else None
        phys = [x for x in lines if x > 0]
        for i, r in enumerate(items):
            # the physical line when the option is a plain list, else the option's line
            ln = phys[i] if len(raw_items) == len(items) and i < len(phys) else first
            out.append((r, _Origin(src, ln)))
        return out

    maxlines = 1
    if final.get("maxlines"):
        src, lines = origin("maxlines")
        try:
            maxlines = int(final["maxlines"])
            if maxlines <= 0:
                raise ValueError
        except ValueError:
            raise FilterError(f"maxlines must be a positive integer, not {final['maxlines']!r}",
                              src, lines[0] if lines else None) from None
    dp = final.get("datepattern")
    dp_src, dp_lines = origin("datepattern")
    journalmatch = [j for j in (final.get("journalmatch") or "").split("\n") if j.strip()]
    prefs = regex_list("prefregex")
    flt = Filter(
        failregex=regex_list("failregex"),
        ignoreregex=regex_list("ignoreregex"),
        prefregex=prefs[0] if prefs else None,
        datepattern=dp,
        datepattern_origin=_Origin(dp_src, dp_lines[0] if dp_lines else None),
        maxlines=maxlines,
        use_dns=final.get("usedns", "yes") or "yes",
        max_line_bytes=max_line_bytes,
        name=name,
        path=path,
        default_tz=default_tz,
    )
    flt.journalmatch = journalmatch
    flt.options = final
    if not flt.failregex:
        flt.unsupported.append(f"{path}: no failregex: this filter never matches anything")
    for (sec, key), (src, lines) in conf.origin.items():
        if "?" in key and key.split("?", 1)[0] in _FILTER_OPTS:
            flt.unsupported.append(
                f"{src}:{abs(lines[0]) if lines else '?'}: conditional option {key!r} in [{sec}] "
                "is ignored (fail2ban uses these in actions, not filters)")
    return flt


# --- the filter -----------------------------------------------------------


class _MlfidCache:
    """Connection-id -> merged failure state, bounded in size and age."""

    def __init__(self, max_count: int = 1000, max_age: float = 300.0) -> None:
        self._d: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self.max_count = max_count
        self.max_age = max_age

    def get(self, key: str) -> dict[str, Any] | None:
        item = self._d.get(key)
        if item is None:
            return None
        if time.monotonic() - item[0] > self.max_age:
            del self._d[key]
            return None
        return item[1]

    def set(self, key: str, value: dict[str, Any]) -> None:
        self._d[key] = (time.monotonic(), value)
        self._d.move_to_end(key)
        while len(self._d) > self.max_count:
            self._d.popitem(last=False)

    def unset(self, key: str) -> None:
        self._d.pop(key, None)

    def __bool__(self) -> bool:
        return bool(self._d)


class Filter:
    """A compiled filter: feed it log lines, get :class:`FailMatch` values.

    Stateful (multi-line buffers, <F-MLFID> connections, last date seen), so
    use one instance per log stream.  Thread-safe: :meth:`process` and
    :meth:`process_text` hold the filter's own lock.  Build one with
    :func:`load_filter` or :meth:`from_inline`.
    """

    def __init__(
        self,
        failregex: Sequence[tuple[str, _Origin]],
        ignoreregex: Sequence[tuple[str, _Origin]] = (),
        prefregex: tuple[str, _Origin] | None = None,
        datepattern: str | None = None,
        *,
        datepattern_origin: _Origin | None = None,
        maxlines: int = 1,
        use_dns: str = "yes",
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        name: str = "inline",
        path: str | None = None,
        default_tz: str | None = None,
    ) -> None:
        if max_line_bytes <= 0:
            raise FilterError(f"max_line_bytes must be positive, not {max_line_bytes}", path)
        self.name = name
        self.path = path
        self.maxlines = maxlines
        self.max_line_bytes = max_line_bytes
        self.unsupported: list[str] = []
        self.journalmatch: list[str] = []
        self.options: dict[str, str] = {}
        #: return DNS names / non-address failure ids as hosts (fail2ban's raw mode)
        self.raw_hosts = False
        #: entries dated in the future are treated as happening now (fail2ban does too)
        self.clamp_future = True
        self._n_lines = 0
        self._n_skipped = 0
        self._review_at = _SCREEN_TRIAL
        self._review_from = self._review_skipped = 0
        self._counts: dict[str, int] = dict.fromkeys(
            ("truncated", "no_date", "dns", "not_address", "matched", "ignored", "errors"), 0)
        self._lock = threading.Lock()
        multiline = maxlines > 1
        self._pref = _Regex(prefregex[0], prefregex[1], use_dns=use_dns) if prefregex else None
        self.failregex = [_Regex(r, o, multiline=multiline, use_dns=use_dns) for r, o in failregex]
        self.ignoreregex = [_Regex(r, o, multiline=multiline, use_dns=use_dns) for r, o in ignoreregex]
        if self._pref is not None:
            pref_keys = self._pref.keys() - {"content"}
            for rx in self.failregex:
                rx.pref_shared = tuple(sorted(pref_keys & rx.keys()))
        pref_has_id = self._pref is not None and any(
            g in self._pref.regex.groupindex for g in _ID_PRESENT_GROUPS)
        for rx in self.failregex:
            if not pref_has_id and not any(g in rx.regex.groupindex for g in _ID_PRESENT_GROUPS):
                raise FilterError(
                    f"failregex {rx.source!r} has no <HOST> (or <ADDR>, <IP4>, <IP6>, <F-ID>, "
                    "<F-MLFID>): nothing to ban",
                    rx.origin.path, rx.origin.line,
                )
        tz = None
        if default_tz:
            try:
                tz = parse_tz_offset(default_tz)
            except DatePatternError as exc:
                raise FilterError(str(exc), path) from exc
        try:
            self._dates = DateDetector(datepattern, default_tz=tz)
        except DatePatternError as exc:
            o = datepattern_origin or _Origin(path, None)
            raise FilterError(str(exc), o.path, o.line) from exc
        self._buffer: list[TupleLine] = []
        self._last_date: float | None = None
        self._last_date_text = ""
        self._mlfid = _MlfidCache()
        self._hosts: dict[tuple[str, str | None], str | None] = {}
        # prefilter: a line must contain one of these unless some regex has none
        self._clauses: tuple[tuple[str, ...], ...] | None = None
        every = [rx.clauses for rx in self.failregex]
        if every and all(every) and not multiline and self._dates.words_survive_cut:
            found = {c for cl in every if cl for c in cl}
            # a clause whose words include all of another clause's is implied by it
            self._clauses = tuple(sorted(
                (c for c in found if not any(o != c and set(o) <= set(c) for o in found)),
                key=lambda c: (-len(c[0]), c)))
        self._literals: tuple[tuple[str, ...], ...] | None = self._clauses
        # dispatch by the first characters of the text: a regex that must start
        # with "Failed " is only tried on text starting with "Fai"
        always = [i for i, rx in enumerate(self.failregex) if len(rx.prefix) < _KEY]
        keyed: dict[str, list[int]] = {}
        for i, rx in enumerate(self.failregex):
            if len(rx.prefix) >= _KEY:
                keyed.setdefault(rx.prefix[:_KEY], []).append(i)
        self._always: tuple[_Regex, ...] = tuple(self.failregex[i] for i in always)
        self._by_key: dict[str, tuple[_Regex, ...]] = {
            k: tuple(self.failregex[i] for i in sorted({*always, *v})) for k, v in keyed.items()
        }
        self._simple = (maxlines == 1 and self._pref is None
                        and not any("mlfid" in rx.regex.groupindex or rx.tuples
                                    for rx in self.failregex))
        self._scan: Callable[[str], bool] | None = None
        self.prefilter = "literal"
        self._check_regexes()

    @classmethod
    def from_inline(cls, failregex: Sequence[str], ignoreregex: Sequence[str] = (),
                    datepattern: str | None = None, maxlines: int = 1, *,
                    prefregex: str | None = None,
                    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                    default_tz: str | None = None) -> Filter:
        """A filter from a jail's inline ``failregex`` (errors name the regex index)."""
        if isinstance(failregex, str):
            failregex = [r for r in failregex.split("\n") if r.strip()]
        if isinstance(ignoreregex, str):
            ignoreregex = [r for r in ignoreregex.split("\n") if r.strip()]
        if not failregex:
            raise FilterError("an inline filter needs at least one failregex")
        if maxlines <= 0:
            raise FilterError(f"maxlines must be a positive integer, not {maxlines!r}")
        return cls(
            [(r, _Origin("<inline failregex>", i + 1)) for i, r in enumerate(failregex)],
            [(r, _Origin("<inline ignoreregex>", i + 1)) for i, r in enumerate(ignoreregex)],
            (prefregex, _Origin("<inline prefregex>", 1)) if prefregex else None,
            datepattern,
            datepattern_origin=_Origin("<inline datepattern>", 1),
            maxlines=maxlines,
            max_line_bytes=max_line_bytes,
            default_tz=default_tz,
        )

    def _check_regexes(self) -> None:
        """Diagnostics for constructs that work differently here (never silent)."""
        nested = re.compile(r"\((?:[^()\\]|\\.)*[+*](?:[^()\\]|\\.)*\)[+*]")
        for rx in (*self.failregex, *self.ignoreregex):
            if nested.search(rx.regex.pattern):
                self.unsupported.append(
                    f"{rx.origin.path}:{rx.origin.line}: nested repetition in {rx.source!r} may "
                    f"backtrack badly; input is capped at {self.max_line_bytes} bytes per line"
                )

    @property
    def prefilter_literals(self) -> tuple[tuple[str, ...], ...] | None:
        """The fast path's clauses (any clause, all its words), or None when
        every line is examined."""
        return self._clauses

    def set_prefilter(self, kind: str) -> None:
        """Choose how lines are pre-screened: "literal" (the required words, with
        ``in``; the default) or "none" (every line goes to the date search and the
        regexes).  Both give the same results; only speed differs."""
        if kind not in ("none", "literal"):
            raise ValueError(f"unknown prefilter {kind!r} (\"literal\" or \"none\")")
        self._install_screen(kind, self._clauses if kind == "literal" else None, None)

    def set_screen(self, name: str, scan: Callable[[str], bool]) -> None:
        """Pre-screen lines with `scan` instead: it must return True for every line
        that could match (a false True only costs time, a false False loses a
        failure).  For measuring other screens against the word screen
        (bench/prefilters.py); `name` is what :attr:`prefilter` then says."""
        self._install_screen(name, None, scan if self._clauses is not None else None)

    def _install_screen(self, name: str, literals: tuple[tuple[str, ...], ...] | None,
                        scan: Callable[[str], bool] | None) -> None:
        with self._lock:
            self.prefilter = name
            self._literals, self._scan = literals, scan
            self._review_at = self._n_lines + _SCREEN_TRIAL
            self._review_from, self._review_skipped = self._n_lines, self._n_skipped

    def reset(self) -> None:
        """Forget buffered lines and connection state (e.g. after log rotation)."""
        with self._lock:
            self._buffer = []
            self._mlfid = _MlfidCache()
            self._last_date = None

    # -- per line ------------------------------------------------------

    def process(self, line: str, *, now: float | None = None,
                date: float | None = None) -> list[FailMatch]:
        """Feed one log line; return the failures it completes (usually 0 or 1).

        ``now`` is the time used for lines without a date (default: the clock);
        ``date`` is the entry's time when the source already knows it (the
        journal): the line is then not searched for a date.
        """
        # the pre-screen is inlined here: it is all most lines ever see
        with self._lock:
            self._n_lines += 1
            if self._n_lines >= self._review_at:
                self._review_screen()
            lits = self._literals
            if lits is not None:
                for clause in lits:
                    if clause[0] in line:
                        for w in clause[1:]:
                            if w not in line:
                                break
                        else:
                            break
                else:
                    self._n_skipped += 1
                    return []
            elif self._scan is not None and not self._scan(line):
                self._n_skipped += 1
                return []
            return self._process(line, now, date)

    def process_lines(self, lines: Iterable[str], *, now: float | None = None) -> list[FailMatch]:
        """:meth:`process` over a batch of lines, taking the lock once.

        For a follower that hands over what it read: same results as calling
        process() per line, minus the per-call overhead.  A line that breaks
        the engine (a bug, never expected) is counted in stats["errors"] and
        skipped instead of losing the rest of the batch.
        """
        out: list[FailMatch] = []
        with self._lock:
            for line in lines:
                self._n_lines += 1
                if self._n_lines >= self._review_at:
                    self._review_screen()
                lits = self._literals
                if lits is not None:
                    for clause in lits:
                        if clause[0] in line:
                            for w in clause[1:]:
                                if w not in line:
                                    break
                            else:
                                break
                    else:
                        self._n_skipped += 1
                        continue
                elif self._scan is not None and not self._scan(line):
                    self._n_skipped += 1
                    continue
                try:
                    out.extend(self._process(line, now, None))
                except Exception:
                    self._counts["errors"] += 1
        return out

    def _review_screen(self) -> None:
        """Keep the word pre-screen only while it pays.

        On a log where nearly every line is a candidate (sshd's auth log for
        the sshd filter) testing a dozen words per line costs more than the
        few skips save; bench/jail_lines.py measured "none" faster there.
        So every window of lines the skip rate is checked: below a quarter,
        the screen is switched off for a while, then tried again.  Results
        are the same either way (the screen is exact); only speed changes.
        """
        window = self._n_lines - self._review_from
        skipped = self._n_skipped - self._review_skipped
        if self.prefilter != "literal" or self._clauses is None:
            self._review_at = 1 << 62
            return
        if self._literals is None:  # was off: try it again
            self._literals = self._clauses
            self._review_at = self._n_lines + _SCREEN_TRIAL
        elif window and skipped * 4 < window:
            self._literals = None
            self._review_at = self._n_lines + _SCREEN_TRIAL * 15
        else:
            self._review_at = self._n_lines + _SCREEN_TRIAL
        self._review_from, self._review_skipped = self._n_lines, self._n_skipped

    @property
    def stats(self) -> dict[str, int]:
        """Counters: lines, prefiltered (rejected by the fast path), truncated,
        no_date, dns and not_address (matches that name no bannable address),
        ignored (by ignoreregex), matched (failures returned), errors
        (process_lines only)."""
        c = self._counts
        return {"lines": self._n_lines, "prefiltered": self._n_skipped, **c}

    def process_text(self, text: str, *, now: float | None = None) -> list[FailMatch]:
        """Feed a chunk of whole lines separated by "\n"; same results as
        calling :meth:`process` on each line, in order.

        The fast path for followers reading a log in blocks: the required
        words are searched in the whole chunk (C speed), and only the lines
        that contain one are handed to the regexes; the others never become
        Python strings.  Multi-line filters and filters without required
        words fall back to line by line.
        """
        with self._lock:
            out: list[FailMatch] = []
            toks = self._literals
            if text.endswith("\n"):
                text = text[:-1]
            if not text:
                return out
            # scanning the chunk once per clause only pays off when few words
            # decide (prosody: one clause); for many clauses go line by line
            if toks is None or self.maxlines > 1 or len(toks) > 3:
                for line in text.split("\n"):
                    self._n_lines += 1
                    if self._n_lines >= self._review_at:
                        self._review_screen()
                        toks = self._literals
                    if (toks is not None and not _any_clause(toks, line)) or (
                            self._scan is not None and not self._scan(line)):
                        self._n_skipped += 1
                        continue
                    out.extend(self._process(line, now, None))
                return out
            n_lines = text.count("\n") + 1
            starts: set[int] = set()
            find, rfind = text.find, text.rfind
            for clause in toks:
                first, rest = clause[0], clause[1:]
                i = find(first)
                while i >= 0:
                    ls = rfind("\n", 0, i) + 1
                    le = find("\n", i)
                    if ls not in starts:
                        line = text[ls:] if le < 0 else text[ls:le]
                        for w in rest:
                            if w not in line:
                                break
                        else:
                            starts.add(ls)
                    if le < 0:
                        break
                    i = find(first, le)
            self._n_lines += n_lines
            self._n_skipped += n_lines - len(starts)
            for ls in sorted(starts):
                le = find("\n", ls)
                line = text[ls:] if le < 0 else text[ls:le]
                out.extend(self._process(line, now, None))
            return out

    def _process(self, line: str, now: float | None, known_date: float | None) -> list[FailMatch]:
        """A line that passed the pre-screen (caller holds the lock and counted it)."""
        line = line.rstrip("\r\n")
        if len(line) * 4 > self.max_line_bytes:  # could be over the cap: measure bytes
            raw = line.encode("utf-8", "surrogatepass")
            if len(raw) > self.max_line_bytes:
                self._counts["truncated"] += 1
                line = raw[: self.max_line_bytes].decode("utf-8", "ignore")
        if now is None:
            now = time.time()
        if known_date is not None:
            return self._find(("", "", line), known_date)
        date: float | None = None
        m, tpl = self._dates.match(line)
        if m is not None and tpl is not None:
            s, e = m.start(1), m.end(1)
            text = line[s:e]
            tuple_line: TupleLine = (line[:s], text, line[e:])
            if text:
                date = self._dates.parse(m, tpl, now)
                if date is not None:
                    self._last_date, self._last_date_text = date, text
            elif self._last_date is not None and self._last_date > now - 60:
                tuple_line = ("", self._last_date_text, line)
                date = self._last_date
            else:
                date = now
        else:
            tuple_line = ("", "", line)
        if date is None:
            self._counts["no_date"] += 1
            if self._last_date is not None and self._last_date > now - 60:
                tuple_line = ("", self._last_date_text, line)
                date = self._last_date
            else:
                date = now
        if self.clamp_future and date > now:
            date = now
        return self._find(tuple_line, date)

    def _find_simple(self, tl: TupleLine, date: float) -> list[FailMatch]:
        """_find() for the common filter: one line, no prefregex, no <F-MLFID>."""
        buf = tl[0] + tl[2] + "\n"
        for rx in self._by_key.get(buf[:_KEY], self._always):
            if rx.prefix and not buf.startswith(rx.prefix):
                continue
            for lit in rx.literals:
                if lit not in buf:
                    break
            else:
                m = rx.regex.search(buf)
                if m is not None:
                    break
        else:
            return []
        if self.ignoreregex and self._ignored(buf, [tl], []):
            return []
        fail = rx.groups(m) if rx.alt or rx.tuples else m.groupdict()
        if fail.get("nofail"):
            return []
        fid = fail.get("fid")
        is_dns = False
        ip = fail.get("ip4") or fail.get("ip6")
        if ip is None:
            ip = fail.get("dns")
            is_dns = ip is not None
            if ip is None:
                ip = fid
                if ip is None:
                    return []
        host = self._host(ip, fail.get("cidr"), is_dns)
        if host is None:
            return []
        tags = {k: v for k in rx.tag_keys if (v := fail.get(k)) is not None}
        if fid is not None and fid != ip:
            tags["id"] = fid
        self._counts["matched"] += 1
        return [FailMatch(host, date, tl[0] + tl[1] + tl[2], tags)]

    def _find(self, tuple_line: TupleLine, date: float) -> list[FailMatch]:
        if self._simple:
            return self._find_simple(tuple_line, date)
        if self.maxlines > 1:
            self._buffer.append(tuple_line)
            self._buffer = self._buffer[-self.maxlines:]
        else:
            self._buffer = [tuple_line]
        org = self._buffer
        first_buf = _tuple_buf(org) if len(org) > 1 else tuple_line[0] + tuple_line[2] + "\n"
        buf: str | None = first_buf
        pre: dict[str, Any] = {}
        if self._pref is not None:
            pm = self._pref.regex.search(first_buf)
            if pm is None:
                return []
            pre = self._pref.groups(pm)
            content = pre.pop("content", None)
            if content:
                self._buffer, buf = [("", "", content)], None
        if buf is None:
            buf = _tuple_buf(self._buffer)
        candidates = self._by_key.get(buf[:_KEY], self._always) if self.maxlines == 1 else self.failregex
        for rx in candidates:
            if buf is None:
                buf = _tuple_buf(self._buffer)
            if rx.prefix and not buf.startswith(rx.prefix):
                continue
            for lit in rx.literals:
                if lit not in buf:
                    break
            else:
                lit = ""
            if lit:
                continue  # a required literal is missing: the regex cannot match
            m = rx.regex.search(buf)
            if m is None:
                continue
            fail = rx.groups(m)
            matched, unmatched = rx.split_lines(m, org) if len(org) > 1 else (list(org), [])
            if self.ignoreregex and self._ignored(buf, matched, unmatched):
                return []
            self._buffer, buf = unmatched, None
            if pre:
                # fail2ban 1.1: a group of failregex that did not take part in the match
                # (None) leaves prefregex's capture of the same name alone (only names
                # both regexes have can differ: sshd's have none, its path stays fast)
                fail = {**pre, **fail}
                for k in rx.pref_shared:
                    if fail[k] is None:
                        fail[k] = pre[k]
            mlfid = fail.get("mlfid")
            if mlfid is not None:
                fail = self._merge(mlfid, fail, matched)
                if fail.get("nofail"):
                    return []
            else:
                fail["matches"] = [*fail.get("matches", []), *matched]
                if fail.get("nofail"):
                    # <F-NOFAIL> without a connection id: a match that is by
                    # definition not a failure (fail2ban's samples agree)
                    return []
            return self._emit(rx, fail, mlfid, date)
        return []

    def _ignored(self, buf: str, matched: list[TupleLine], unmatched: list[TupleLine]) -> bool:
        text = _tuple_buf(matched) if self.maxlines > 1 else buf
        for ig in self.ignoreregex:
            if ig.regex.search(text):
                self._counts["ignored"] += 1
                if self.maxlines > 1:
                    self._buffer = unmatched
                return True
        return False

    def _merge(self, mlfid: str, fail: dict[str, Any], matched: list[TupleLine]) -> dict[str, Any]:
        """Merge a failure into its connection's state (fail2ban's <F-MLFID> rules)."""
        cached = self._mlfid.get(mlfid) if self._mlfid else None
        users: set[str] | None = None
        flags = 0  # 1: nofail now, 2: forget, 4: had nofail/gained, 8: gained now
        if fail.get("mlfgained"):
            flags |= 8 | 1
            if not fail.get("nofail"):
                fail["nofail"] = fail["mlfgained"]
        elif fail.get("nofail"):
            flags |= 1
        if fail.pop("mlfforget", None):
            flags |= 2
        if cached is not None:
            users = self._users(cached, fail.get("user"))
            if cached.pop("nofail", None):
                flags |= 4
            if cached.pop("mlfgained", None):
                flags |= 4
            if flags & 8:
                cached.pop("mlfpending", None)
            if (flags & 4) == 0 and not cached.get("mlfpending", 0):
                cached.pop("matches", None)
            cached.update((k, v) for k, v in fail.items() if v is not None)
            fail = cached
            if flags & 2:
                self._mlfid.unset(mlfid)
        elif not (flags & 2):
            users = self._users(fail, fail.get("user"))
            self._mlfid.set(mlfid, fail)
        if fail.pop("mlfpending", 0) or (users and len(users) > 1):
            fail.pop("nofail", None)
            fail.pop("mlfgained", None)
            flags &= ~(8 | 1)
        if (flags & 1) == 0:
            ms = fail.pop("nofail-matches", [])
            ms = ms + fail.get("matches", [])
            if (flags & 8) == 0:
                ms = ms + matched
            fail["matches"] = ms
        elif (flags & 3) == 1:
            fail["nofail-matches"] = fail.get("nofail-matches", []) + matched
        return fail

    @staticmethod
    def _users(fail: dict[str, Any], user: str | None) -> set[str] | None:
        users: set[str] | None = fail.get("users")
        if user:
            if not users:
                users = set()
                fail["users"] = users
            users.add(user)
        return users

    def _emit(self, rx: _Regex, fail: dict[str, Any], mlfid: str | None, date: float
              ) -> list[FailMatch]:
        fid = fail.get("fid")
        is_dns = False
        ip = fail.get("ip4")
        if ip is None:
            ip = fail.get("ip6")
        if ip is None:
            ip = fail.get("dns")
            is_dns = ip is not None
        if ip is None:
            if fid is None and mlfid is None:
                return []
            ip = fid
        if ip is None:
            # an <F-MLFID> line that names no address yet: remember, report later
            fail["mlfpending"] = 1
            return []
        host = self._host(str(ip), fail.get("cidr"), is_dns)
        if host is None:
            return []
        tags = {k: v for k, v in fail.items() if isinstance(v, str) and k not in _INTERNAL_KEYS
                and not k.startswith(("skiplines", "alt_", "tuple_", "_"))}
        if fid is not None and fid != ip:
            tags["id"] = str(fid)
        users = fail.get("users")
        if users and len(users) > 1:
            tags["users"] = ",".join(sorted(users))
        lines = fail.get("matches") or []
        text = "\n".join("".join(t) for t in lines)
        self._counts["matched"] += 1
        return [FailMatch(host=host, time=date, line=text, tags=tags)]

    def _host(self, ip: str, cidr: str | None, is_dns: bool) -> str | None:
        if self.raw_hosts:
            return ip
        if is_dns:
            self._counts["dns"] += 1
            return None
        key = (ip, cidr)
        hit = self._hosts.get(key, "")
        if hit != "":
            if hit is None:
                self._counts["not_address"] += 1
            return hit
        host = self._normalise_host(ip, cidr)
        if len(self._hosts) >= 65536:
            self._hosts.clear()
        self._hosts[key] = host
        return host

    def _normalise_host(self, ip: str, cidr: str | None) -> str | None:
        try:
            addr = ipaddress.ip_address(ip.strip("[]"))
        except ValueError:
            self._counts["not_address"] += 1
            return None
        if cidr:
            try:
                net = ipaddress.ip_network(f"{addr}/{int(cidr)}", strict=False)
            except ValueError:
                self._counts["not_address"] += 1
                return None
            if net.prefixlen < net.max_prefixlen:
                return str(net)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(addr)


def _any_clause(clauses: Sequence[tuple[str, ...]], line: str) -> bool:
    for clause in clauses:
        for w in clause:
            if w not in line:
                break
        else:
            return True
    return False


def iter_failures(flt: Filter, lines: Iterator[str], now: float | None = None) -> Iterator[FailMatch]:
    """Convenience: every FailMatch of an iterable of lines."""
    for ln in lines:
        yield from flt.process(ln, now=now)
