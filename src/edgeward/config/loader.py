"""Reading a config file: TOML → schema → cross-checks, every problem at file:line:col.

tomllib keeps no positions, so `_KeyLocator` scans the text once to learn where
each key was written; schema and cross-check errors are then reported where the
user wrote the value, with a hint on how to fix it.

Parts that know more about their options than the schema can say (the guard:
does this filter load?) pass their own checks to `load`/`loads`; the config
layer imports none of them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .schema import Config, PoolSettings, ServiceSettings
from .units import BindSpec, HttpScheme, looks_like_address, parse_bind, parse_target

if TYPE_CHECKING:
    from pydantic import TypeAdapter

T = TypeVar("T")
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
    """Maps a key path (("services", "web", "to")) to where it was written: the key, and its value."""

    def __init__(self, text: str) -> None:
        self.where: dict[tuple[str, ...], tuple[int, int]] = {}
        self.values: dict[tuple[str, ...], tuple[int, int]] = {}
        table: list[str] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            stripped = line.lstrip()
            if not stripped or stripped.startswith("#"):
                continue
            h = _HEADER_RE.match(line)
            if h and not _KEY_RE.match(line):
                table = _split_dotted(h.group(2))
                # [service.web] also locates "service": a misspelt table is reported at its header.
                for n in range(1, len(table) + 1):
                    self.where.setdefault(tuple(table[:n]), (lineno, line.index("[") + 1))
                continue
            k = _KEY_RE.match(line)
            if k:
                path = (*table, *_split_dotted(k.group(1)))
                self.where.setdefault(path, (lineno, len(line) - len(stripped) + 1))
                after = line[k.end():]
                self.values.setdefault(path, (lineno, k.end() + len(after) - len(after.lstrip()) + 1))
                # Keys of an inline table on the same line: { port = 8080, http = "/h" }
                rest = line[k.end() :]
                if "{" in rest:
                    for m in _INLINE_KEY_RE.finditer(rest[rest.index("{") :]):
                        self.where.setdefault((*path, m.group(1)), (lineno, k.end() + rest.index("{") + m.start() + 1))

    def find(self, loc: Loc, *, value: bool = False) -> tuple[int, int]:
        """Where `loc` was written (its value with `value`), else its nearest written parent."""
        keys = tuple(str(p) for p in loc if not isinstance(p, int))
        if value and keys in self.values:
            return self.values[keys]
        while keys:
            if keys in self.where:
                return self.where[keys]
            keys = keys[:-1]
        return (1, 1)


def _options_at(loc: Loc) -> list[str] | None:
    """The option names the schema allows in the table at `loc` (None if it is not a table of options)."""
    model: object = Config
    parts = list(loc)
    while parts:
        fields = _fields(model)
        if fields is None:
            return None
        part = parts.pop(0)
        model = fields.get(str(part))
        if model is None:
            return None
        # Unwrap X | None, dict[str, X] (a table of named tables: the next part is a name), list[X].
        while True:
            origin, args = typing.get_origin(model), typing.get_args(model)
            if origin in (typing.Union, types.UnionType):
                tables = [a for a in args if dataclasses.is_dataclass(a) or typing.get_origin(a) in (dict, list)]
                if not tables:
                    return None
                model = tables[0]
            elif origin is dict and parts:
                parts.pop(0)
                model = args[1]
            elif origin is list and parts and isinstance(parts[0], int):
                parts.pop(0)
                model = args[0]
            else:
                break
    fields = _fields(model)
    return list(fields) if fields is not None else None


def _fields(model: object) -> dict[str, object] | None:
    """A table's options and their types (Annotated's extras dropped), or None if `model` is not a table."""
    if not isinstance(model, type) or not dataclasses.is_dataclass(model):
        return None
    hints = typing.get_type_hints(model)
    return {f.name: hints[f.name] for f in dataclasses.fields(model)}


def _schema_problem(name: str, err: Mapping[str, Any], locator: _KeyLocator) -> Problem:
    """A pydantic error said the way the rest of `check` speaks: where, what, how to fix it."""
    loc: Loc = tuple(err["loc"])
    where = ".".join(str(x) for x in loc)
    kind = err["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):  # (a dataclass's unknown key)
        key, parent = str(loc[-1]), loc[:-1]
        options = _options_at(parent) or []
        line, col = locator.find(loc)
        if not parent and isinstance(err.get("input"), dict):
            close = _close_matches(key, options)
            hint = f"did you mean [{close[0]}]?" if close else "tables: " + ", ".join(f"[{o}]" for o in options)
            return Problem(name, line, col, f"unknown table [{key}]", hint)
        hint = _did_you_mean(key, options) or ("options here: " + ", ".join(options) if options else "")
        in_table = f" in [{'.'.join(str(x) for x in parent)}]" if parent else ""
        return Problem(name, line, col, f"unknown option {key!r}{in_table}", hint)
    if kind == "missing":
        line, col = locator.find(loc)
        return Problem(name, line, col, f"{where}: required option is missing", f"add {loc[-1]} = ...")
    line, col = locator.find(loc, value=True)
    given = err.get("input")
    if kind == "list_type" and isinstance(given, (str, int)):
        return Problem(name, line, col, f"{where}: a list is expected, not a single value",
                       f"write {loc[-1]} = [{json.dumps(given)}]")
    msg = str(err["msg"]).removeprefix("Value error, ")
    return Problem(name, line, col, f"{where}: {msg}", "")


def load(path: str | Path, checks: Sequence[Check] = ()) -> Config:
    """Read, validate and cross-check a config file, then run `checks`. Raises ConfigError."""
    return loads(read(path), str(Path(path)), checks)


def read(path: str | Path) -> str:
    """A config file's text (what `load` reads); ConfigError if it cannot be read as UTF-8 text."""
    name = str(Path(path))
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(name, 1, 1, f"cannot read the config: {e.strerror}", "check the path")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(name, 1, 1, f"not UTF-8 text: {e.reason}", "save the file as UTF-8")]) from None


def loads(text: str, name: str = "<config>", checks: Sequence[Check] = ()) -> Config:
    """`load` of a config's text; `name` is the file name problems are reported under."""
    import tomllib  # here, like pydantic below: a daemon that only reads checked configs needs neither
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        line, col = (int(m.group(1)), int(m.group(2))) if m else (1, 1)
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError([Problem(name, line, col, f"TOML syntax: {msg}", "see https://toml.io")]) from None
    locator = _KeyLocator(text)
    # pydantic is imported here only: the running edge reads validated configs, it never validates one.
    from pydantic import ValidationError
    try:
        cfg = validate(Config, data)
    except ValidationError as e:
        raise ConfigError(_in_file_order([_schema_problem(name, err, locator) for err in e.errors()])) from None
    problems = list(_cross_check(cfg, name, locator))
    for check in checks:
        for loc, message, hint in check(cfg):
            line, col = locator.find(loc, value=True)
            problems.append(Problem(name, line, col, message, hint))
    if problems:
        raise ConfigError(_in_file_order(problems))
    return cfg


def validate(table: type[T], data: object) -> T:
    """`data` (as tomllib reads it) validated as `table`, one of the schema's tables; raises
    pydantic's ValidationError. What `loads` does without locations: for tests and tools."""
    adapter = _adapters.get(table)
    if adapter is None:
        from pydantic import TypeAdapter
        adapter = _adapters[table] = TypeAdapter(table)
    return adapter.validate_python(data)  # type: ignore[no-any-return]


_adapters: dict[type[Any], TypeAdapter[Any]] = {}  # pydantic's validator of each table, built once


def _in_file_order(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line, p.col))


def _close_matches(word: str, choices: list[str]) -> list[str]:
    import difflib  # only when there is a problem to report
    return difflib.get_close_matches(word, choices, n=1, cutoff=0.6)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = _close_matches(word, list(choices))
    return f"did you mean {close[0]!r}?" if close else ""


def resolve_listen(cfg: Config, item: str) -> list[BindSpec]:
    """A service's listen entry → bind specs (a listener name or an address)."""
    if item in cfg.listeners:
        return [parse_bind(b) for b in cfg.listeners[item].bind]
    return [parse_bind(item)]


def _cross_check(cfg: Config, name: str, locator: _KeyLocator) -> Iterable[Problem]:
    def at(loc: Loc, message: str, hint: str = "") -> Problem:
        line, col = locator.find(loc, value=True)
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
                # A listener name with a typo, or an address with a bad part (said by `e`, which names it).
                hint = _did_you_mean(item, cfg.listeners)
                if not hint and not any(c.isdigit() for c in item):
                    hint = "name a [listeners.X] table or write an address like \"[::]:443\""
                yield at(("services", sname, "listen", i), f"services.{sname}.listen: {e}", hint)
                continue
            for port in spec.ports():
                if (spec.transport, spec.host, port) in listener_bind_keys:
                    yield at(("services", sname, "listen", i), f"{item!r} is already bound by a [listeners] table",
                             "name that listener instead of repeating its address")
                    break

        yield from _check_udp_service(cfg, sname, at)

        # `to`: pool name first, then a handoff endpoint, else an address.
        if svc.to not in cfg.pools and svc.to not in cfg.handoffs:
            if looks_like_address(svc.to):
                try:
                    parse_target(svc.to)
                except ValueError as e:
                    yield at(("services", sname, "to"), f"to: {e}")
            else:
                hint = _did_you_mean(svc.to, [*cfg.pools, *cfg.handoffs])
                yield at(("services", sname, "to"), f"to: no pool named {svc.to!r}",
                         hint or "define [pools." + svc.to + "] (or [handoffs." + svc.to + "]) or write an address like \"10.0.0.2:443\"")

    # Two services that would take exactly the same clients on one listener are ambiguous.
    # HTTP services with the same match fields may share a listener when their path prefixes differ.
    seen: dict[tuple[object, ...], list[tuple[str, frozenset[str] | None]]] = {}
    reported: set[tuple[str, str]] = set()
    for sname, svc in cfg.services.items():
        names: list[str | None] = list(svc.names) or [None]
        paths = frozenset(svc.paths or ["/"]) if service_scheme(cfg, svc) else None
        for item in svc.listen:
            try:
                specs = resolve_listen(cfg, item)
            except ValueError:
                continue
            for spec in specs:
                for port in spec.ports():
                    for n in names:
                        rkey = (spec.transport, spec.host, port, n, svc.protocol, tuple(sorted(svc.alpn)), tuple(sorted(svc.source)))
                        for other, other_paths in seen.get(rkey, []):
                            if other == sname or (other, sname) in reported:
                                continue
                            what = f"name {n!r}" if n else "no match fields (both are the default)"
                            if paths is None and other_paths is None:
                                hint = "give one of them names, protocol, alpn or source to tell them apart"
                            elif paths is None or other_paths is None:
                                hint = ("one proxies HTTP and the other relays bytes, so they cannot share these match "
                                        "fields; give one of them other names, protocol, alpn or source")
                            elif paths & other_paths:
                                hint = f"both take the path prefix {min(paths & other_paths)!r}; give them different paths"
                            else:
                                continue
                            reported.add((other, sname))
                            yield at(("services", sname), f"services {other!r} and {sname!r} both take {spec.host}:{port} with {what}", hint)
                        if (sname, paths) not in seen.setdefault(rkey, []):
                            seen[rkey].append((sname, paths))

    for sname in cfg.services:
        yield from _check_handoff_service(cfg, sname, at)
    for hname in cfg.handoffs:
        if hname in cfg.pools:
            yield at(("handoffs", hname), f"{hname!r} is both a pool and a handoff endpoint",
                     "give one of them another name: a service's `to` names either")

    for pname, pool in cfg.pools.items():
        yield from _check_pool(pname, pool, at)
        yield from _check_pool_schemes(pname, pool, at)

    for sname in cfg.services:
        yield from _check_http_service(cfg, sname, at)

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


def _check_handoff_service(cfg: Config, sname: str, at: Callable[..., Problem]) -> Iterable[Problem]:
    """A service handing off: TCP only, and a fallback that is a relayable address or pool."""
    svc = cfg.services[sname]
    if svc.to not in cfg.handoffs:
        if svc.fallback is not None:
            yield at(("services", sname, "fallback"), f"service {sname!r}: fallback applies to services that hand "
                     f"off, but {svc.to!r} is not a [handoffs] endpoint",
                     "remove fallback, or set to = the name of a [handoffs.NAME] table")
        return
    for i, item in enumerate(svc.listen):
        specs = _safe_binds(item) if item not in cfg.listeners else resolve_listen(cfg, item)
        if any(spec.transport == "udp" for spec in specs):
            yield at(("services", sname, "listen", i), f"service {sname!r} hands off TCP sockets but listens on UDP "
                     f"({item!r})", "give the UDP address a service of its own")
    fb = svc.fallback
    if fb is None:
        return
    if fb in cfg.handoffs:
        yield at(("services", sname, "fallback"), f"service {sname!r}: fallback {fb!r} is a handoff endpoint",
                 "the fallback relays: give an address (\"127.0.0.1:8443\") or a pool")
    elif fb in cfg.pools:
        if service_scheme(cfg, ServiceSettings(listen=svc.listen, to=fb)) is not None:
            yield at(("services", sname, "fallback"), f"service {sname!r}: fallback pool {fb!r} has HTTP servers",
                     "the fallback relays bytes: use a pool of host:port servers")
    elif looks_like_address(fb):
        try:
            t = parse_target(fb)
        except ValueError as e:
            yield at(("services", sname, "fallback"), f"fallback: {e}")
        else:
            if t.scheme is not None:
                yield at(("services", sname, "fallback"), f"service {sname!r}: fallback {fb!r} is an HTTP upstream",
                         "the fallback relays bytes: write host:port (\"127.0.0.1:8443\")")
    else:
        yield at(("services", sname, "fallback"), f"fallback: no pool named {fb!r}",
                 _did_you_mean(fb, cfg.pools) or "write an address like \"127.0.0.1:8443\" or a pool name")


def _target_scheme(address: str) -> HttpScheme | None:
    try:
        return parse_target(address).scheme
    except ValueError:
        return None


def service_scheme(cfg: Config, svc: ServiceSettings) -> HttpScheme | None:
    """"http" or "https" for a service whose upstream is HTTP (`to` or its pool's servers carry a
    scheme), else None (bytes are relayed)."""
    pool = cfg.pools.get(svc.to)
    if pool is None:
        return _target_scheme(svc.to) if looks_like_address(svc.to) else None
    first = pool.servers[0]
    return _target_scheme(first if isinstance(first, str) else first.address)


def _check_pool_schemes(pname: str, pool: PoolSettings, at: Callable[..., Problem]) -> Iterable[Problem]:
    addresses = [s if isinstance(s, str) else s.address for s in pool.servers]
    schemes = {_target_scheme(a) for a in addresses}
    if len(schemes) > 1:
        shown = ", ".join(sorted(f"{s}://" if s else "plain host:port" for s in schemes))
        yield at(("pools", pname, "servers"), f"pool {pname!r} mixes servers of different kinds ({shown})",
                 "every server of a pool is either http://, https:// or a plain address; split the pool")


def _check_http_service(cfg: Config, sname: str, at: Callable[..., Problem]) -> Iterable[Problem]:
    """Options that only mean something for HTTP upstreams, and what HTTP upstreams cannot have."""
    svc = cfg.services[sname]
    try:
        scheme = service_scheme(cfg, svc)
    except ValueError:
        return
    if scheme is None:
        if svc.paths:
            yield at(("services", sname, "paths"), f"service {sname!r}: paths route HTTP requests, but it relays bytes to {svc.to!r}",
                     "write to = \"http://HOST:PORT\" or \"https://HOST:PORT\" to proxy HTTP, or remove paths")
        if svc.upstream_tls is not None:
            yield at(("services", sname, "upstream_tls"), f"service {sname!r}: upstream_tls applies to https:// upstreams only",
                     "write to = \"https://HOST:PORT\", or remove upstream_tls (relayed TLS reaches the upstream untouched)")
        return
    if scheme == "http" and svc.upstream_tls is not None:
        yield at(("services", sname, "upstream_tls"), f"service {sname!r}: upstream_tls is set but the upstream is plain http://",
                 "write to = \"https://...\" or remove upstream_tls")
    tls = svc.upstream_tls
    if tls is not None and not tls.verify and (tls.ca or tls.pin):
        yield at(("services", sname, "upstream_tls", "verify"),
                 f"service {sname!r}: upstream_tls.verify = false turns off the checks that ca/pin configure",
                 "remove verify = false to check against ca or pin, or remove ca and pin")
    if tls is not None and tls.ca is not None and not Path(tls.ca).is_file():
        yield at(("services", sname, "upstream_tls", "ca"), f"service {sname!r}: CA file {tls.ca!r} does not exist",
                 "give the path of a PEM file with the upstream's CA (or its self-signed certificate)")
    pool = cfg.pools.get(svc.to)
    proxy = svc.proxy_protocol or (pool.proxy_protocol if pool is not None else "off")
    if proxy != "off":
        where = ("services", sname, "proxy_protocol") if svc.proxy_protocol else ("pools", svc.to, "proxy_protocol")
        yield at(where, f"service {sname!r} proxies HTTP, which tells the upstream the client address in "
                 f"X-Forwarded-For and Forwarded, not in PROXY {proxy} headers",
                 "set proxy_protocol = \"off\" (upstream keep-alive connections are shared by clients)")
    for i, item in enumerate(svc.listen):
        for spec in _safe_binds(item) if item not in cfg.listeners else resolve_listen(cfg, item):
            if spec.transport == "udp":
                yield at(("services", sname, "listen", i), f"service {sname!r} proxies HTTP but listens on UDP ({item!r})",
                         "HTTP runs over TCP; give the UDP address a service of its own")
                break


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
