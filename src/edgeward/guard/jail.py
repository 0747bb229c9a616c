"""Jails: failures per address in a sliding window, and when to ban for how long.

Pure logic - no I/O, no clock of its own (every call takes `now`), so every
rule is unit-tested directly. The `Guard` feeds it `FailMatch`es from sources
and turns its `BanDecision`s into stored and enforced bans.

Semantics follow fail2ban where users know them:
- an address is banned when it has `maxretry` failures within `findtime`
  seconds (counted by the entries' own times);
- `bantime < 0` bans forever; growing bans (`bantime.increment`) multiply the
  jail's bantime by ``2**count * factor`` (or by `multipliers[count]`, or by a
  restricted `formula`) where ``count`` is the number of earlier bans of the
  address (in this jail, or in all jails with `overalljails`), capped at
  `maxtime`, plus up to `rndtime` random seconds.
"""

from __future__ import annotations

import ast
import ipaddress
import logging
import operator
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edgeward.config.schema import BanIncrementSettings
from edgeward.guard.banset import normalize_addr
from edgeward.guard.types import FailMatch

log = logging.getLogger(__name__)

# Lines kept per address as the reason of a ban; bounded like everything else.
_MAX_REASON_LINE = 2000
# Entries dated further ahead than this are skipped (broken clock or year inference).
MAX_FUTURE_SKEW = 86400.0
# fail2ban's default growth formula, with the same exponent cap.
DEFAULT_FORMULA = "ban.Time * (1<<(ban.Count if ban.Count<20 else 20)) * banFactor"


class JailError(ValueError):
    """A jail setting that cannot work (bad address, bad formula, ...)."""


# -- growing bans ---------------------------------------------------------------

_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
}
_CMPOPS: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


def compile_formula(text: str) -> Callable[[float, int, float], float]:
    """Compile a fail2ban `bantime.formula` into f(time, count, factor).

    fail2ban evaluates the formula as Python; edgeward accepts only arithmetic,
    comparisons, ``a if c else b``, ``min``/``max`` and the names ``ban.Time``,
    ``ban.Count``, ``banFactor`` - a config file must not run code.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise JailError(f"bantime.formula: {exc.msg}") from None

    def check(node: ast.AST) -> None:
        if isinstance(node, ast.Expression):
            check(node.body)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            check(node.left)
            check(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            check(node.operand)
        elif isinstance(node, ast.Compare) and all(type(o) in _CMPOPS for o in node.ops):
            check(node.left)
            for c in node.comparators:
                check(c)
        elif isinstance(node, ast.IfExp):
            check(node.test)
            check(node.body)
            check(node.orelse)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("min", "max")
        ):
            if node.keywords or not node.args:
                raise JailError("bantime.formula: min/max take positional arguments only")
            for a in node.args:
                check(a)
        elif isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            pass
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id != "ban" or node.attr not in ("Time", "Count"):
                raise JailError(f"bantime.formula: unknown name ban.{node.attr}")
        elif isinstance(node, ast.Name) and node.id == "banFactor":
            pass
        else:
            raise JailError(f"bantime.formula: {type(node).__name__} is not allowed")

    check(tree)

    def ev(node: ast.AST, t: float, c: int, f: float) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body, t, c, f)
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left, t, c, f), ev(node.right, t, c, f)
            if isinstance(node.op, ast.LShift | ast.Pow) and abs(right) > 64:
                raise JailError("bantime.formula: exponent too large")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand, t, c, f)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Compare):
            left = ev(node.left, t, c, f)
            for op, comp in zip(node.ops, node.comparators, strict=True):
                right = ev(comp, t, c, f)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return ev(node.body, t, c, f) if ev(node.test, t, c, f) else ev(node.orelse, t, c, f)
        if isinstance(node, ast.Call):
            args = [ev(a, t, c, f) for a in node.args]
            return min(args) if node.func.id == "min" else max(args)  # type: ignore[attr-defined]
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Attribute):
            return t if node.attr == "Time" else c
        return f  # banFactor

    def formula(t: float, c: int, f: float) -> float:
        return float(ev(tree, t, c, f))

    formula(600.0, 1, 1.0)  # fail at load time, not at the first ban
    return formula


@dataclass(slots=True)
class BanHistory:
    """Earlier bans per address: (jail, start) pairs, for growing bans.

    Shared by all jails (for `overalljails`); the Guard loads it from the store
    at start and records every new ban. Bounded per address.
    """

    max_per_address: int = 64
    _bans: dict[str, deque[tuple[str, float]]] = field(default_factory=dict)

    def record(self, addr: str, jail: str, start: float) -> None:
        q = self._bans.get(addr)
        if q is None:
            q = self._bans[addr] = deque(maxlen=self.max_per_address)
        q.append((jail, start))

    def count(self, addr: str, jail: str | None = None, since: float | None = None) -> int:
        q = self._bans.get(addr)
        if not q:
            return 0
        return sum(1 for j, t in q if (jail is None or j == jail) and (since is None or t >= since))

    def forget(self, addr: str | None = None) -> None:
        if addr is None:
            self._bans.clear()
        else:
            self._bans.pop(addr, None)

    def forget_before(self, cutoff: float) -> None:
        for addr, q in list(self._bans.items()):
            while q and q[0][1] < cutoff:
                q.popleft()
            if not q:
                del self._bans[addr]


# -- ignore lists ----------------------------------------------------------------


class IgnoreList:
    """Addresses and networks (v4 and v6) that are never banned.

    Exact addresses are a set lookup; networks are few and checked in turn.
    """

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._addrs: set[str] = set()
        self._nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in items:
            text = item.strip()
            if not text:
                continue
            if "/" in text:
                try:
                    net = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    raise JailError(f"ignoreip: {item!r} is not an address or network") from None
                if net.prefixlen == net.max_prefixlen:
                    # the schema writes "192.0.2.7" as "192.0.2.7/32": a set lookup, not a scan
                    key = normalize_addr(str(net.network_address))
                    if key is not None:
                        self._addrs.add(key)
                        continue
                if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
                    # ::ffff:a.b.c.d/104 should cover the IPv4 form the ban set uses.
                    mapped = net.network_address.ipv4_mapped
                    if mapped is not None:
                        self._nets.append(
                            ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}", strict=False)
                        )
                self._nets.append(net)
            else:
                key = normalize_addr(text)
                if key is None:
                    raise JailError(f"ignoreip: {item!r} is not an address or network")
                self._addrs.add(key)

    def __contains__(self, addr: object) -> bool:
        if not isinstance(addr, str):
            return False
        if addr in self._addrs:
            return True
        if not self._nets:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in self._nets)

    def __bool__(self) -> bool:
        return bool(self._addrs or self._nets)


# -- the jail --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BanDecision:
    """A ban the jail wants: the Guard stores it, then enforces it."""

    jail: str
    address: str
    start: float
    end: float | None  # None: forever
    bantime: float  # seconds actually applied (negative: forever)
    count: int  # 1 for the first ban of this address (see BanIncrementSettings.overalljails)
    failures: int  # failures that led to it (0 for manual bans)
    lines: tuple[str, ...]  # the matched entries, oldest first
    reason: str


@dataclass(slots=True)
class _Failures:
    times: deque[float]
    lines: deque[str]
    total: int = 0


@dataclass(slots=True)
class JailStats:
    """Counters, for status and metrics."""

    failures: int = 0  # matches accepted into the window
    ignored: int = 0  # matches from ignoreip
    too_old: int = 0  # matches older than findtime (e.g. re-reading a log)
    future: int = 0  # matches dated more than MAX_FUTURE_SKEW ahead
    invalid: int = 0  # matches whose host is not an address
    evicted: int = 0  # addresses dropped because max_tracked was reached
    bans: int = 0


class Jail:
    """Failure counting and ban decisions for one jail.

    `filter` is carried for the Guard (anything with
    ``process(line, *, now) -> list[FailMatch]``); the jail itself only sees
    matches. `max_tracked` bounds memory: when more addresses are being
    counted, the one least recently seen is forgotten.
    """

    def __init__(
        self,
        name: str,
        filter: object = None,
        *,
        maxretry: int = 5,
        findtime: float = 600.0,
        bantime: float = 600.0,
        ignoreip: Iterable[str] = (),
        increment: BanIncrementSettings | None = None,
        history: BanHistory | None = None,
        max_tracked: int = 100_000,
        rng: random.Random | None = None,
    ) -> None:
        if maxretry < 1:
            raise JailError(f"jail {name}: maxretry must be >= 1")
        if findtime <= 0:
            raise JailError(f"jail {name}: findtime must be > 0")
        if bantime == 0:
            raise JailError(f"jail {name}: bantime must not be 0 (negative bans forever)")
        self.name = name
        self.filter = filter
        self.maxretry = maxretry
        self.findtime = float(findtime)
        self.bantime = float(bantime)
        self.ignoreip = IgnoreList(ignoreip)
        # None or enabled = false: every ban lasts `bantime`
        self.increment = increment if increment is not None and increment.enabled else None
        self._formula = compile_formula(
            (self.increment.formula if self.increment is not None else None) or DEFAULT_FORMULA
        )
        self._overall = self.increment is not None and self.increment.overalljails
        self.history = history if history is not None else BanHistory()
        self.max_tracked = max(1, max_tracked)
        self._rng = rng or random.Random()
        self._failures: dict[str, _Failures] = {}
        self.stats = JailStats()

    # -- counting --------------------------------------------------------------

    def add_failure(self, match: FailMatch, now: float) -> BanDecision | None:
        """Count one failure; returns a decision when the address must be banned."""
        addr = normalize_addr(match.host)
        if addr is None:
            self.stats.invalid += 1
            return None
        if addr in self.ignoreip:
            self.stats.ignored += 1
            return None
        t = match.time
        if t > now + MAX_FUTURE_SKEW:
            self.stats.future += 1
            return None
        t = min(t, now)  # small clock skew between the log writer and us
        if t < now - self.findtime:
            self.stats.too_old += 1
            return None
        self.stats.failures += 1
        f = self._failures.pop(addr, None)  # re-insert below: dict order is LRU order
        if f is None:
            if len(self._failures) >= self.max_tracked:
                del self._failures[next(iter(self._failures))]
                self.stats.evicted += 1
            f = _Failures(deque(maxlen=self.maxretry), deque(maxlen=self.maxretry))
        self._failures[addr] = f
        f.times.append(t)
        f.lines.append(match.line[:_MAX_REASON_LINE])
        f.total += 1
        # Only the last `maxretry` times matter: ban iff they span <= findtime.
        if len(f.times) < self.maxretry:
            return None
        if max(f.times) - min(f.times) > self.findtime:
            return None
        del self._failures[addr]
        return self._decide(addr, now, failures=len(f.times), lines=tuple(f.lines), reason="")

    def failures(self, now: float | None = None) -> dict[str, int]:
        """Failures within the window per address (all counted ones if `now` is None)."""
        out: dict[str, int] = {}
        for addr, f in self._failures.items():
            n = len(f.times) if now is None else sum(1 for t in f.times if t >= now - self.findtime)
            if n:
                out[addr] = n
        return out

    def forget(self, addr: str | None = None) -> None:
        """Drop failure counts (of one address, or all)."""
        if addr is None:
            self._failures.clear()
        else:
            key = normalize_addr(addr)
            if key is not None:
                self._failures.pop(key, None)

    def prune(self, now: float) -> int:
        """Forget addresses with no failure inside the window; returns how many."""
        cutoff = now - self.findtime
        stale = [a for a, f in self._failures.items() if not f.times or f.times[-1] < cutoff]
        for a in stale:
            del self._failures[a]
        return len(stale)

    # -- deciding ----------------------------------------------------------------

    def manual_ban(
        self, addr: str, now: float, *, reason: str = "manual", bantime: float | None = None
    ) -> BanDecision:
        """A ban asked for by the admin; ignoreip does not apply (the admin said so)."""
        key = normalize_addr(addr)
        if key is None:
            raise JailError(f"{addr!r} is not an IP address")
        self._failures.pop(key, None)
        return self._decide(key, now, failures=0, lines=(), reason=reason, bantime=bantime)

    def ban_time(self, addr: str, now: float) -> tuple[float, int]:
        """(bantime, ban count) for a new ban of `addr` now, growth applied."""
        inc = self.increment
        previous = self.history.count(addr, None if self._overall else self.name)
        count = previous + 1
        bantime = self.bantime
        if bantime < 0 or inc is None or previous == 0:
            return bantime, count
        if inc.multipliers:
            m = inc.multipliers[min(previous, len(inc.multipliers) - 1)]
            bantime = bantime * m * inc.factor
        else:
            try:
                bantime = self._formula(bantime, previous, inc.factor)
            except (ArithmeticError, JailError, TypeError, ValueError) as exc:
                log.warning("jail %s: bantime.formula failed (%s); using bantime", self.name, exc)
                bantime = self.bantime
        if inc.rndtime > 0:
            bantime += self._rng.random() * inc.rndtime
        if inc.maxtime is not None and inc.maxtime > 0 and bantime > inc.maxtime:
            bantime = inc.maxtime
        if bantime <= 0:
            bantime = self.bantime
        return bantime, count

    def _decide(
        self,
        addr: str,
        now: float,
        *,
        failures: int,
        lines: tuple[str, ...],
        reason: str,
        bantime: float | None = None,
    ) -> BanDecision:
        if bantime is None or bantime == 0:
            bantime, count = self.ban_time(addr, now)
        else:
            count = self.history.count(addr, None if self._overall else self.name) + 1
        end = None if bantime < 0 else now + bantime
        if not reason:
            reason = f"{failures} failures within {self.findtime:g}s"
        self.stats.bans += 1
        return BanDecision(
            jail=self.name,
            address=addr,
            start=now,
            end=end,
            bantime=bantime,
            count=count,
            failures=failures,
            lines=lines,
            reason=reason,
        )
