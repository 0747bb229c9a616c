"""Parsing of the config's units: durations, sizes, addresses, CIDRs.

Each parser accepts the human form (``"5m"``, ``"64KiB"``, ``"[::]:443"``) and
raises ``ValueError`` with a message that says what a good value looks like;
pydantic turns that into a located config error.

`Before` and `After` attach parsers and checks to a type in ``Annotated[...]``
without importing pydantic: they speak its documented protocol
(``__get_pydantic_core_schema__``), so pydantic is loaded only by what validates
a config (config/loader.py), never by the running edge, which only reads one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

if TYPE_CHECKING:
    from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
    from pydantic_core import CoreSchema


class Before:
    """In ``Annotated[T, Before(parse)]``: `parse` turns the value as written (``"5m"``) into a `T`
    before pydantic checks it as one, like pydantic's BeforeValidator; `json_schema`, when given,
    replaces the type's JSON Schema (WithJsonSchema) and `serialize` is how the value is written
    back (PlainSerializer: the defaults shown by `edgeward schema`)."""

    def __init__(self, parse: Callable[[Any], Any], *, json_schema: dict[str, Any] | None = None,
                 serialize: Callable[[Any], str] | None = None) -> None:
        self.parse = parse
        self.json_schema = json_schema
        self.serialize = serialize

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        from pydantic_core import core_schema
        ser = None if self.serialize is None else core_schema.plain_serializer_function_ser_schema(
            self.serialize, return_schema=core_schema.str_schema())
        return core_schema.no_info_before_validator_function(self.parse, handler(source), serialization=ser)

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        if self.json_schema is None:
            return dict(handler(schema))
        return dict(self.json_schema)


class _Bound:
    """In ``Annotated[T, Ge(1)]``: a bound pydantic enforces (and `edgeward schema` shows), given to
    pydantic as the annotated_types constraint of the same name, so that it checks it natively,
    with its own errors ("Input should be greater than or equal to 1"). annotated_types is imported
    only when a validator is built: with typing_extensions and datetime it costs ~0.7 MB of RSS."""

    __slots__ = ("value",)

    def __init__(self, value: float) -> None:
        self.value = value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        import annotated_types
        constraint = getattr(annotated_types, type(self).__name__)(self.value)
        return handler(Annotated[source, constraint])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"


class Ge(_Bound):
    """>= value"""


class Gt(_Bound):
    """> value"""


class Le(_Bound):
    """<= value"""


class Lt(_Bound):
    """< value"""


class MinLen(_Bound):
    """at least `value` items"""


class After:
    """In ``Annotated[T, After(check)]``: `check` takes the validated value and returns it (or a
    normal form of it), raising ValueError with what is wrong; like pydantic's AfterValidator
    (and a field_validator)."""

    def __init__(self, check: Callable[[Any], Any]) -> None:
        self.check = check

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        from pydantic_core import core_schema
        return core_schema.no_info_after_validator_function(self.check, handler(source))


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "k": 1024, "K": 1024, "M": 1024**2, "G": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from ``"250ms" "5s" "5m" "1h" "1d"``, a number, or ``-1`` (forever)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like \"5s\" or \"5m\", not a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            inner = parse_duration(text[1:])
            return -inner
        m = _DURATION_RE.match(text)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"cannot read {value!r} as a duration (write e.g. \"250ms\", \"5s\", \"5m\", \"1h\", \"1d\")")


def parse_size(value: object) -> int:
    """Bytes from ``"64KiB" "1MiB" "16k"`` or a plain number."""
    if isinstance(value, bool):
        raise ValueError("expected a size like \"64KiB\", not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f"cannot read {value!r} as a size (write e.g. \"16KiB\", \"1MiB\" or a number of bytes)")


def _format_duration(v: float) -> str:
    return f"{v:g}s"


Duration = Annotated[
    float,
    Before(parse_duration, serialize=_format_duration,
           json_schema={"type": ["string", "number"], "pattern": r"^-?\d+(\.\d+)?(ms|s|m|h|d|w)?$",
                        "description": "a duration: \"250ms\", \"5s\", \"5m\", \"1h\", \"1d\" or seconds"}),
]
Size = Annotated[
    int,
    Before(parse_size, json_schema={"type": ["string", "integer"], "pattern": r"^\d+(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?$",
                                    "description": "a size: \"64KiB\", \"1MiB\" or bytes"}),
]


def parse_cidr(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an address or CIDR string like \"10.0.0.0/8\", got {value!r}")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR (write e.g. \"192.0.2.7\", \"10.0.0.0/8\", \"2001:db8::/32\")") from None


CIDR = Annotated[str, Before(parse_cidr)]

Transport = Literal["tcp", "udp"]


@dataclass(frozen=True, slots=True)
class BindSpec:
    """One listen address: transport, host and an inclusive port range."""

    transport: Transport
    host: str
    first_port: int
    last_port: int

    def ports(self) -> range:
        return range(self.first_port, self.last_port + 1)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        ports = str(self.first_port) if self.first_port == self.last_port else f"{self.first_port}-{self.last_port}"
        prefix = "udp/" if self.transport == "udp" else ""
        return f"{prefix}{host}:{ports}"


def _split_host_port(text: str) -> tuple[str, str | None]:
    """``"[::1]:443" -> ("::1", "443")``, ``"10.0.0.2" -> ("10.0.0.2", None)``."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address (write e.g. \"[::1]:443\")")
        host = text[1:end]
        rest = text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']'")
        return host, rest[1:]
    if text.count(":") > 1:
        # A bare IPv6 literal has no port; asking for brackets avoids guessing.
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an address (IPv6 with a port needs brackets: \"[2001:db8::1]:443\")") from None
        return text, None
    if ":" in text:
        host, port = text.rsplit(":", 1)
        return host, port
    return text, None


def _port(text: str, whole: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{whole!r}: port {text!r} is not a number")
    if not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: port {int(text)} is out of range (1-65535)")
    return int(text)


def parse_bind(value: str) -> BindSpec:
    """``"[::]:443"``, ``"udp/0.0.0.0:3478"``, ``"127.0.0.1:10000-10100"``."""
    text = value.strip()
    transport: Transport = "tcp"
    for prefix in ("tcp/", "udp/"):
        if text.startswith(prefix):
            transport = "udp" if prefix == "udp/" else "tcp"
            text = text[len(prefix) :]
    host, port = _split_host_port(text)
    if port is None:
        raise ValueError(f"{value!r}: a listen address needs a port (write e.g. \"[::]:443\" or \"0.0.0.0:10000-10100\")")
    if not host:
        raise ValueError(f"{value!r}: empty host (write \"0.0.0.0:PORT\" for all IPv4 or \"[::]:PORT\" for all addresses)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: listen on an IP address, not the name {host!r}") from None
    if "-" in port:
        first_s, last_s = port.split("-", 1)
        first, last = _port(first_s, value), _port(last_s, value)
        if last < first:
            raise ValueError(f"{value!r}: port range ends before it starts")
        if last - first >= 4096:
            raise ValueError(f"{value!r}: port range of {last - first + 1} ports is larger than 4096")
    else:
        first = last = _port(port, value)
    return BindSpec(transport, host, first, last)


HttpScheme = Literal["http", "https"]
HTTP_DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Target:
    """Where a service's clients go: a host and port (None = the port they came to), or a Unix socket.

    `scheme` is set for an HTTP upstream ("http://host[:port]", "https://host[:port]"): the edge then
    speaks HTTP to it (and TLS for https) instead of relaying bytes; its port is never None.
    """

    host: str | None
    port: int | None
    unix_path: str | None = None
    scheme: HttpScheme | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else str(self.host)
        address = host if self.port is None else f"{host}:{self.port}"
        return address if self.scheme is None else f"{self.scheme}://{address}"


def looks_like_address(text: str) -> bool:
    """True for what can only be an address (IP literal, dotted name, unix:, http(s)://), not a pool name."""
    if text.lower().startswith(("unix:", "[", "http://", "https://")):
        return True
    host, port = _split_host_port(text) if text.count(":") <= 1 or text.startswith("[") else (text, None)
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return "." in host or port is not None or host == "localhost"


def parse_target(value: str) -> Target:
    """``"10.0.0.2:443"``, ``"10.0.0.2"`` (same port), ``"unix:/run/app.sock"``, ``"https://10.0.0.5"``
    (an HTTP upstream; default port 80 for http, 443 for https)."""
    text = value.strip()
    scheme, sep, rest = text.partition("://")
    if sep:
        if scheme.lower() not in HTTP_DEFAULT_PORTS:
            raise ValueError(f"{value!r}: unknown scheme {scheme!r} (write \"http://host[:port]\" or \"https://host[:port]\")")
        rest = rest[:-1] if rest.endswith("/") else rest  # "https://10.0.0.5/" is a common way to write it
        if any(c in rest for c in "/?#@"):
            raise ValueError(f"{value!r}: an HTTP upstream is a scheme, a host and a port, without path, query or user "
                             "(write e.g. \"https://10.0.0.5\" or \"http://127.0.0.1:5280\")")
        http_scheme: HttpScheme = "https" if scheme.lower() == "https" else "http"
        host, port = _split_host_port(rest)
        if not host:
            raise ValueError(f"{value!r}: empty host")
        return Target(host, HTTP_DEFAULT_PORTS[http_scheme] if port is None else _port(port, value), None, http_scheme)
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/") and not path.startswith("@"):
            raise ValueError(f"{value!r}: a unix socket path must be absolute (\"unix:/run/app.sock\")")
        return Target(None, None, path)
    host, port = _split_host_port(text)
    if not host:
        raise ValueError(f"{value!r}: empty host")
    return Target(host, None if port is None else _port(port, value))
