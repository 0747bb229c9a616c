"""Reading a config file: TOML → schema → cross-checks, every problem at file:line:col.

tomllib keeps no positions, so `_KeyLocator` scans the text once to learn where
each key was written; schema and cross-check errors are then reported where the
user wrote the value, with a hint on how to fix it.

Parts that know more about their options than the schema can say (the guard:
does this filter load?) pass their own checks to `load`/`loads`; the config
layer imports none of them.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .schema import Config, PoolSettings
from .units import BindSpec, looks_like_address, parse_bind, parse_target

Loc = tuple[str | int, ...]
# A check of a schema-valid config: yields (key path, message, hint) per problem,
# e.g. (("jails", "prosody", "filter"), "jail prosody: no filter named 'prosdy'", "...").
Check = Callable[[Config], Iterable[tuple[Loc, str, str]]]


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    col: int
    message: str
    hint: str = ""

    def __str__(self) -> str:
        hint = f" ({self.hint})" if self.hint else ""
        return f"{self.file}:{self.line}:{self.col}: {self.message}{hint}"


class ConfigError(Exception):
    """The config cannot be used; `problems` says every reason and where."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_.\-]+)(?:\s*\.\s*(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+))*)\s*=")
_INLINE_KEY_RE = re.compile(r"([A-Za-z0-9_\-]+)\s*=")


def _split_dotted(key: str) -> list[str]:
    parts: list[str] = []
    for m in re.finditer(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_\-]+)", key):
        parts.append(next(g for g in m.groups() if g is not None))
    return parts


class _KeyLocator:
    """Maps a key path (("services", "web", "to")) to where it was written."""

    def __init__(self, text: str) -> None:
        self.where: dict[tuple[str, ...], tuple[int, int]] = {}
        table: list[str] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            stripped = line.lstrip()
            if not stripped or stripped.startswith("#"):
                continue
            h = _HEADER_RE.match(line)
            if h and not _KEY_RE.match(line):
                table = _split_dotted(h.group(2))
                self.where.setdefault(tuple(table), (lineno, line.index("[") + 1))
                continue
            k = _KEY_RE.match(line)
            if k:
                path = (*table, *_split_dotted(k.group(1)))
                self.where.setdefault(path, (lineno, len(line) - len(stripped) + 1))
                # Keys of an inline table on the same line: { port = 8080, http = "/h" }
                rest = line[k.end() :]
                if "{" in rest:
                    for m in _INLINE_KEY_RE.finditer(rest[rest.index("{") :]):
                        self.where.setdefault((*path, m.group(1)), (lineno, k.end() + rest.index("{") + m.start() + 1))

    def find(self, loc: Loc) -> tuple[int, int]:
        keys = tuple(str(p) for p in loc if not isinstance(p, int))
        while keys:
            if keys in self.where:
                return self.where[keys]
            keys = keys[:-1]
        return (1, 1)


def _hint_for(err_type: str, msg: str) -> str:
    if err_type == "extra_forbidden":
        return "remove it or check its spelling against `edgeward schema`"
    if err_type == "missing":
        return "add it"
    return ""


def load(path: str | Path, checks: Sequence[Check] = ()) -> Config:
    """Read, validate and cross-check a config file, then run `checks`. Raises ConfigError."""
    p = Path(path)
    name = str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(name, 1, 1, f"cannot read the config: {e.strerror}", "check the path")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(name, 1, 1, f"not UTF-8 text: {e.reason}", "save the file as UTF-8")]) from None
    return loads(text, name, checks)


def loads(text: str, name: str = "<config>", checks: Sequence[Check] = ()) -> Config:
    """`load` of a config's text; `name` is the file name problems are reported under."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        line, col = (int(m.group(1)), int(m.group(2))) if m else (1, 1)
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError([Problem(name, line, col, f"TOML syntax: {msg}", "see https://toml.io")]) from None
    locator = _KeyLocator(text)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            line, col = locator.find(err["loc"])
            where = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(Problem(name, line, col, f"{where}: {msg}", _hint_for(err["type"], msg)))
        raise ConfigError(problems) from None
    problems = list(_cross_check(cfg, name, locator))
    for check in checks:
        for loc, message, hint in check(cfg):
            line, col = locator.find(loc)
            problems.append(Problem(name, line, col, message, hint))
    if problems:
        raise ConfigError(problems)
    return cfg


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def resolve_listen(cfg: Config, item: str) -> list[BindSpec]:
    """A service's listen entry → bind specs (a listener name or an address)."""
    if item in cfg.listeners:
        return [parse_bind(b) for b in cfg.listeners[item].bind]
    return [parse_bind(item)]


def _cross_check(cfg: Config, name: str, locator: _KeyLocator) -> Iterable[Problem]:
    def at(loc: Loc, message: str, hint: str = "") -> Problem:
        line, col = locator.find(loc)
        return Problem(name, line, col, message, hint)

    # Admin API: loopback or unix unless a token is set (security by default).
    admin = cfg.edge.admin
    if not admin.startswith("unix:"):
        try:
            t = parse_target(admin)
            if t.port is None:
                raise ValueError("no port")
            host_ip = ipaddress.ip_address(t.host or "")
            if not host_ip.is_loopback and not cfg.edge.admin_token:
                yield at(("edge", "admin"), f"admin API on non-loopback address {admin!r} without admin_token",
                         "set edge.admin_token, or use 127.0.0.1:PORT or unix:/path")
        except ValueError:
            yield at(("edge", "admin"), f"{admin!r} is not an admin address", "write \"127.0.0.1:9901\" or \"unix:/run/edgeward/admin.sock\"")

    # Every bind address is owned once: a port given twice is an error.
    owner: dict[tuple[str, str, int], tuple[str, Loc]] = {}
    for lname, lst in cfg.listeners.items():
        for i, b in enumerate(lst.bind):
            spec = parse_bind(b)
            for port in spec.ports():
                key = (spec.transport, spec.host, port)
                if key in owner:
                    yield at(("listeners", lname, "bind", i), f"{spec.transport} port {spec.host}:{port} is given twice "
                             f"(also in {owner[key][0]})", "list each address once; services share a listener by naming it")
                    break
                owner[key] = (f"listener {lname!r}", ("listeners", lname, "bind", i))

    listener_bind_keys = {
        (spec.transport, spec.host, port)
        for lst in cfg.listeners.values() for b in lst.bind for spec in [parse_bind(b)] for port in spec.ports()
    }
    for sname, svc in cfg.services.items():
        for i, item in enumerate(svc.listen):
            if item in cfg.listeners:
                continue
            try:
                spec = parse_bind(item)
            except ValueError as e:
                hint = _did_you_mean(item, cfg.listeners) or "name a [listeners.X] table or write an address like \"[::]:443\""
                yield at(("services", sname, "listen", i), f"listen {item!r}: {e}", hint)
                continue
            for port in spec.ports():
                if (spec.transport, spec.host, port) in listener_bind_keys:
                    yield at(("services", sname, "listen", i), f"{item!r} is already bound by a [listeners] table",
                             "name that listener instead of repeating its address")
                    break

        yield from _check_udp_service(cfg, sname, at)

        # `to`: pool name first, else an address.
        if svc.to not in cfg.pools:
            if looks_like_address(svc.to):
                try:
                    parse_target(svc.to)
                except ValueError as e:
                    yield at(("services", sname, "to"), f"to: {e}")
            else:
                hint = _did_you_mean(svc.to, cfg.pools)
                yield at(("services", sname, "to"), f"to: no pool named {svc.to!r}",
                         hint or "define [pools." + svc.to + "] or write an address like \"10.0.0.2:443\"")

    # Two services that would take exactly the same clients on one listener are ambiguous.
    seen: dict[tuple[object, ...], str] = {}
    for sname, svc in cfg.services.items():
        names: list[str | None] = list(svc.names) or [None]
        for item in svc.listen:
            try:
                specs = resolve_listen(cfg, item)
            except ValueError:
                continue
            for spec in specs:
                for port in spec.ports():
                    for n in names:
                        rkey = (spec.transport, spec.host, port, n, svc.protocol, tuple(sorted(svc.alpn)), tuple(sorted(svc.source)))
                        if rkey in seen and seen[rkey] != sname:
                            what = f"name {n!r}" if n else "no match fields (both are the default)"
                            yield at(("services", sname), f"services {seen[rkey]!r} and {sname!r} both take {spec.host}:{port} with {what}",
                                     "give one of them names, protocol, alpn or source to tell them apart")
                        seen.setdefault(rkey, sname)

    for pname, pool in cfg.pools.items():
        yield from _check_pool(pname, pool, at)

    for lname, lst in cfg.listeners.items():
        if lst.trusted_proxies and any(spec.transport == "udp" for b in lst.bind for spec in _safe_binds(b)):
            yield at(("listeners", lname, "trusted_proxies"), f"listener {lname!r} has UDP binds, which never carry PROXY headers",
                     "keep trusted_proxies on a listener with TCP binds only")

    known_listeners = set(cfg.listeners) | {str(spec) for svc in cfg.services.values() for item in svc.listen
                                            if item not in cfg.listeners for spec in _safe_binds(item)}
    for jname, jail in cfg.jails.items():
        for i, lname in enumerate(jail.listeners or []):
            if lname not in known_listeners:
                yield at(("jails", jname, "listeners", i), f"jail {jname!r} protects unknown listener {lname!r}",
                         _did_you_mean(lname, known_listeners) or "name a [listeners.X] table or a service's listen address")


def _check_udp_service(cfg: Config, sname: str, at: Callable[..., Problem]) -> Iterable[Problem]:
    """A service with UDP binds: routed by source only, no PROXY header, no unix target, no address twice."""
    svc = cfg.services[sname]
    udp_item: str | None = None
    seen: set[tuple[str, str, int]] = set()
    for i, item in enumerate(svc.listen):
        try:
            specs = resolve_listen(cfg, item)
        except ValueError:
            continue
        for spec in specs:
            if spec.transport == "udp" and udp_item is None:
                udp_item = item
            keys = {(spec.transport, spec.host, port) for port in spec.ports()}
            twice = keys & seen
            if twice:
                t, h, p = min(twice)
                yield at(("services", sname, "listen", i), f"service {sname!r} listens on {t} {h}:{p} twice",
                         "list each address once")
            seen |= keys
    if udp_item is None:
        return
    for key in ("names", "protocol", "alpn"):
        if getattr(svc, key):
            yield at(("services", sname, key), f"service {sname!r}: {key} cannot select UDP clients ({udp_item!r}); "
                     "UDP is routed by source address only, never sniffed",
                     "move the UDP addresses to a service of their own without names, protocol or alpn")
    pool = cfg.pools.get(svc.to)
    proxy = svc.proxy_protocol or (pool.proxy_protocol if pool is not None else "off")
    if proxy != "off":
        where = ("services", sname, "proxy_protocol") if svc.proxy_protocol else ("pools", svc.to, "proxy_protocol")
        yield at(where, f"service {sname!r} listens on UDP ({udp_item!r}) but would send PROXY {proxy} headers, "
                 "which edgeward does not send over UDP",
                 "set proxy_protocol = \"off\" on this service, or give the UDP addresses a service of their own with it")
    targets = [svc.to] if pool is None else [s if isinstance(s, str) else s.address for s in pool.servers]
    if any(t.strip().startswith("unix:") for t in targets):
        yield at(("services", sname, "to"), f"service {sname!r} listens on UDP ({udp_item!r}) but goes to a unix socket",
                 "give UDP a host:port, or a host alone for the same port")


def _safe_binds(item: str) -> list[BindSpec]:
    try:
        return [parse_bind(item)]
    except ValueError:
        return []


def _check_pool(pname: str, pool: PoolSettings, at: object) -> Iterable[Problem]:
    assert callable(at)
    addresses = [s if isinstance(s, str) else s.address for s in pool.servers]
    dupes = {a for a in addresses if addresses.count(a) > 1}
    for d in sorted(dupes):
        yield at(("pools", pname, "servers"), f"pool {pname!r} lists server {d!r} twice", "list each server once; use weight for a bigger share")
    if pool.health and pool.health.http and not pool.health.http.startswith("/"):
        yield at(("pools", pname, "health", "http"), f"health path {pool.health.http!r} must start with '/'", "write e.g. \"/about/health\"")
