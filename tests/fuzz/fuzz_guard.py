"""Fuzz targets for the guard: the fail2ban filter engine and the date parser.

Both read text an attacker partly writes (a user name, a request line, an SSH
client version end up in the logs the jails follow), so both must take any line:

- ``filter``: log lines through real filters (edgeward's prosody-auth, fail2ban's
  sshd / nginx-http-auth / postfix / dovecot when Debian's fail2ban is installed,
  and inline filters using prefregex, <F-ID>/<F-MLFID>, maxlines > 1 and a
  custom datepattern). Nothing may raise; a reported host is a valid address and
  its time a finite number.
- ``date``: lines through the default date templates and a set of custom
  datepatterns; the first input byte may also ask to compile the rest of the
  input as a datepattern, which must either work or raise DatePatternError.

The targets share fuzz_codecs.py's Target/check contract (a value or an allowed
error out, anything else escapes); they return small outcome objects instead of
codec values.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass

from edgeward.guard.datedetect import DateDetector, DatePatternError
from edgeward.guard.filter import EDGEWARD_FILTER_DIR, Filter, FilterError, load_filter
from edgeward.guard.types import FailMatch

NOW = 1_700_000_000.0  # fixed clock: outcomes do not depend on when the fuzzer runs
MAX_TEXT = 8192  # long lines are cut by the followers before the filter sees them anyway

SYSTEM_FILTERS = ("sshd", "nginx-http-auth", "postfix", "dovecot")
SYSTEM_FILTER_DIR = "/etc/fail2ban/filter.d"


@dataclass(frozen=True, slots=True)
class Matches:
    """Outcome of the filter target: how many failures the lines produced."""

    count: int


@dataclass(frozen=True, slots=True)
class Dated:
    """Outcome of the date target: how many dates were found and parsed."""

    found: int
    parsed: int


class BrokenInvariant(AssertionError):
    """A filter or the date parser produced a value that cannot be right."""


def _inline_filters() -> list[Filter]:
    return [
        # prefregex + <F-CONTENT> + user capture, like fail2ban's sshd family
        Filter.from_inline(
            [r"^Failed (?:password|publickey) for (?:invalid user )?<F-USER>\S+</F-USER> from <HOST>"
             r"(?: port \d+)?(?: ssh\d*)?\s*$",
             r"^Invalid user <F-USER>.*?</F-USER> from <HOST>\s*$"],
            [r"^Failed password for root from 192\.0\.2\.\d+"],
            prefregex=r"^\S+ sshd\[<F-MLFID>\d+</F-MLFID>\]: <F-CONTENT>.+</F-CONTENT>$",
        ),
        # several lines matched together, an <F-ID> instead of a host, custom date pattern
        Filter.from_inline(
            [r"^login attempt user=<F-ID>[\w.@-]+</F-ID>\n.*denied from <ADDR>$"],
            datepattern=r"^%Y-%m-%d[T ]%H:%M:%S(?:\.%f)?%z?",
            maxlines=2,
        ),
        # epoch dates, IPv6 and CIDR captures
        Filter.from_inline([r"client <IP6> failed", r"net <SUBNET> flooded", r"peer <IP4>:\d+ reset"],
                           datepattern="{^LN-BEG}EPOCH"),
    ]


def _filters() -> list[Filter]:
    out = [load_filter("prosody-auth", search_dirs=(EDGEWARD_FILTER_DIR,))]
    if os.path.isdir(SYSTEM_FILTER_DIR):
        for name in SYSTEM_FILTERS:
            try:
                out.append(load_filter(name, search_dirs=(SYSTEM_FILTER_DIR, EDGEWARD_FILTER_DIR)))
            except FilterError:
                continue  # an older fail2ban without this filter: fuzz the others
    return out + _inline_filters()


_FILTERS: list[Filter] | None = None


def _check_match(m: FailMatch) -> None:
    try:
        ipaddress.ip_network(m.host, strict=False)
    except ValueError:
        if not m.host or any(c.isspace() for c in m.host):
            raise BrokenInvariant(f"filter reported host {m.host!r}") from None
        # an <F-ID> failure id is not an address; it is still one word
    if not math.isfinite(m.time):
        raise BrokenInvariant(f"filter reported time {m.time!r}")


def filter_lines(data: bytes) -> Matches:
    """First byte: which filter; the rest: log lines (UTF-8, bad bytes replaced, as followers do)."""
    global _FILTERS
    if _FILTERS is None:
        _FILTERS = _filters()
    if not data:
        return Matches(0)
    flt = _FILTERS[data[0] % len(_FILTERS)]
    flt.reset()
    text = data[1 : 1 + MAX_TEXT].decode("utf-8", "replace")
    n = 0
    for line in text.split("\n"):
        for m in flt.process(line, now=NOW):
            _check_match(m)
            n += 1
    return Matches(n)


# None: the default templates (what a filter without datepattern uses).
PATTERNS: tuple[str | None, ...] = (
    None,
    "%Y-%m-%d %H:%M:%S",
    "{^LN-BEG}%b %d %H:%M:%S",
    "^%d/%b/%Y:%H:%M:%S %z",
    "%ExY%Exm%Exd-%ExH%ExM%ExS",
    "LEPOCH",
    "TAI64N",
    "{DATE} ",
    r"\[%a %b %d %H:%M:%S(?:\.%f)? %Y\]",
)


_DETECTORS: dict[str | None, DateDetector] = {}


def _detector(pattern: str | None) -> DateDetector:
    """A detector as fresh as a new one: it remembers which template worked last and where, and an
    input's outcome must not depend on the inputs before it (a crash must reproduce alone).
    Built once per pattern (building one compiles dozens of regexes) and its memory reset."""
    det = _DETECTORS.get(pattern)
    if det is None:
        det = _DETECTORS[pattern] = DateDetector(pattern)
    det._last = None
    det._last_pos = 1
    det._distance = {}
    return det


def date_lines(data: bytes) -> Dated:
    """First byte: which detector (or, with its top bits set, compile the rest as a pattern)."""
    if not data:
        return Dated(0, 0)
    text = data[1 : 1 + MAX_TEXT].decode("utf-8", "replace")
    if data[0] >= 0xF0:
        # Compiling only: a pattern comes from the admin's config, so matching with a
        # fuzzed regex would only measure how slow a bad regex can be.
        try:
            DateDetector(text[:200])
        except DatePatternError:
            return Dated(-1, 0)
        return Dated(0, 0)
    det = _detector(PATTERNS[data[0] % len(PATTERNS)])
    found = parsed = 0
    for line in text.split("\n"):
        m, tpl = det.match(line)
        if m is None or tpl is None:
            continue
        found += 1
        value = det.parse(m, tpl, NOW)
        if value is not None:
            if not math.isfinite(value):
                raise BrokenInvariant(f"date parsed to {value!r} from {line!r}")
            parsed += 1
    return Dated(found, parsed)


FILTER_SEEDS = [
    b"\x00Nov 21 17:00:00 c2s55d5f4ebd6c0\tinfo\tFailed authentication attempt (not-authorized) "
    b"for user alice@example.org from IP: 198.51.100.7\n"
    b"Nov 21 17:00:01 host prosody[812]: c2s55d5f4ebd6c0: Failed authentication attempt "
    b"(not-authorized) for user bob@example.org from IP: 2001:db8::7",
    b"\x01Nov 21 17:00:02 host sshd[1234]: Failed password for invalid user admin from 192.0.2.10 "
    b"port 51234 ssh2\nNov 21 17:00:03 host sshd[1234]: Invalid user oracle from 192.0.2.11 port 1",
    b"\x02192.0.2.1 - - [21/Nov/2026:17:00:00 +0000] \"GET /admin HTTP/1.1\" 401 0\n"
    b"2026/11/21 17:00:00 [error] 12#12: *1 user \"x\": password mismatch, client: 192.0.2.4, "
    b"server: a.example, request: \"GET / HTTP/1.1\", host: \"a.example\"",
    b"\x03Nov 21 17:00:04 mail postfix/smtpd[99]: NOQUEUE: reject: RCPT from unknown[192.0.2.5]: "
    b"554 5.7.1 <x@example.org>: Relay access denied; from=<a@b> to=<x@example.org> proto=ESMTP",
    b"\x04Nov 21 17:00:05 mail dovecot: auth: passwd-file(bob,192.0.2.6): unknown user\n"
    b"Nov 21 17:00:05 mail dovecot: imap-login: Disconnected (auth failed, 1 attempts): "
    b"user=<bob>, method=PLAIN, rip=192.0.2.6, lip=192.0.2.1",
    b"\x05gw sshd[77]: Failed password for root from 198.51.100.9 port 22 ssh2\n"
    b"Nov 21 17:00:06 gw sshd[78]: Invalid user a b from 2001:db8::5",
    b"\x062026-11-21T17:00:07.123+0100 login attempt user=carol@example.org\n"
    b"2026-11-21 17:00:08 denied from 203.0.113.5",
    b"\x071763744400 client 2001:db8::99 failed\n1763744401 net 192.0.2.0/24 flooded\n"
    b"[1763744402] peer 192.0.2.77:4000 reset",
]
DATE_SEEDS = [
    b"\x00Nov 21 17:00:00 host sshd[1]: x\n2026-11-21 17:00:00,123 y\n21/Nov/2026:17:00:00 +0100 z",
    b"\x01@4000000068a1b2c30a1b2c3d4 tai\n1763744400 epoch\n[Fri Nov 21 17:00:00.123 2026] apache",
    b"\x0220261121-170000 short\nSat, 21 Nov 2026 17:00:00 GMT rfc\n2026-11-21T17:00:00Z iso",
    b"\x05Nov 31 25:61:61 impossible\nFeb 30 2026 bad\n99999999999 far",
    b"\x07[Fri Nov 21 17:00:00.5 2026] x",
    b"\xf0%Y-%m-%d %H:%M:%S",
    b"\xf1{^LN-BEG}%b %d %H:%M:%S(?:\\.%f)?",
]
