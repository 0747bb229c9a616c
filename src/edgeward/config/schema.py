"""The config schema: the one description of every option, its default, unit and help.

`edgeward schema` prints it as JSON Schema; docs/config.md shows it in use.
Tables forbid unknown keys so that a typo is an error with a location, not a
silently ignored option.

The tables are plain frozen dataclasses, so that the running edge reads its config
without pydantic (about 16 MB of a daemon that is meant to fit a small VPS):
`edgeward run` has the config validated in a short-lived process (config_checker.py)
and unpickles the result. pydantic validates these same classes in that process, in
`edgeward check` and in tests (config/loader.py), taking from each field:
its type; its bounds (units.Ge, Gt, Le, Lt, MinLen in ``Annotated``);
its unit parser and checks (units.Before, units.After, read by pydantic only);
its help (``metadata={"description": ...}``, which pydantic takes as the field's
description); and a table's cross-field rules from ``__post_init__``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from .units import CIDR, After, Duration, Ge, Gt, Le, Lt, MinLen, Size, parse_bind, parse_target

ProxyProtocol = Literal["off", "v1", "v2"]
Protocol = Literal["tls", "http", "xmpp", "ssh", "unknown"]
AcmeChallenge = Literal["http-01", "tls-alpn-01"]


class _Options:
    """What every table of options shares: unknown keys are errors (pydantic reads this
    attribute as the config of a stdlib dataclass)."""

    __pydantic_config__ = {"extra": "forbid"}


def doc(text: str) -> dict[str, str]:
    """A field's help, as field metadata (pydantic takes its "description" for the JSON Schema)."""
    return {"description": text}


def _check_workers(v: int | str) -> int | str:
    if isinstance(v, int) and not 1 <= v <= 256:
        raise ValueError(f"workers = {v}: between 1 and 256, or \"auto\" (one per CPU)")
    return v


@dataclass(frozen=True, kw_only=True)
class EdgeSettings(_Options):
    """Process-wide settings."""

    admin: str = field(default="127.0.0.1:9901", metadata=doc(
        "Admin API address: \"unix:/path\" or host:port. Loopback or a Unix socket unless admin_token is set."))
    admin_token: str | None = field(default=None, metadata=doc(
        "Bearer token the admin API requires; mandatory for a non-loopback admin address."))
    state_dir: str = field(default="/var/lib/edgeward", metadata=doc("Where bans and log positions are kept."))
    max_connections: Annotated[int, Ge(1)] = field(default=20000, metadata=doc(
        "Global limit of concurrent TCP connections."))
    max_connections_per_client: Annotated[int, Ge(0)] = field(default=512, metadata=doc(
        "Concurrent TCP connections one client address may hold (0 = no limit)."))
    max_udp_sessions: Annotated[int, Ge(1)] = field(default=20000, metadata=doc(
        "Global limit of live UDP sessions (one upstream socket each)."))
    max_udp_sessions_per_client: Annotated[int, Ge(0)] = field(default=512, metadata=doc(
        "Live UDP sessions one client address may hold over all UDP ports (0 = no limit)."))
    drain_timeout: Duration = field(default=30.0, metadata=doc(
        "On SIGTERM, how long established connections may finish."))
    nofile: int | Literal["max"] = field(default="max", metadata=doc(
        "Open-files soft limit to set at start (\"max\" = the hard limit)."))
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata=doc("Log verbosity."))
    splice: bool = field(default=True, metadata=doc("Relay with splice() (zero-copy) where the OS has it."))
    access_log: str | None = field(default=None, metadata=doc(
        "Write one line per closed TCP connection and ended UDP session (client, service, upstream, bytes, "
        "duration, end reason) to this file (\"-\" = standard output, \"stderr\" = standard error); unset = no "
        "access log. Reopened on SIGUSR1 and on reload, so logrotate's move + `kill -USR1` (or `edgeward reload`) "
        "works."))
    access_log_format: Literal["text", "json"] = field(default="text", metadata=doc(
        "Access log lines as logfmt text (key=value) or JSON objects."))
    workers: Annotated[int | Literal["auto"], After(_check_workers)] = field(default=1, metadata=doc(
        "Data-plane processes (like nginx's worker_processes, HAProxy's nbthread). 1 = one process doing "
        "everything. N > 1: a master keeps the control plane (config, reload, health checks, guard, ACME, admin "
        "API) and N workers accept on SO_REUSEPORT sockets the master holds; \"auto\" = one per CPU."))


def _check_bind(v: list[str]) -> list[str]:
    for item in v:
        parse_bind(item)
    return v


@dataclass(frozen=True, kw_only=True)
class ListenerSettings(_Options):
    """A named listener: addresses shared by services, with socket and sniffing options."""

    bind: Annotated[list[str], MinLen(1), After(_check_bind)] = field(metadata=doc(
        "Addresses: \"[::]:443\", \"0.0.0.0:10000-10100\", \"udp/[::]:3478\"."))
    sniff_timeout: Duration = field(default=5.0, metadata=doc("Longest wait for the first bytes to decide a route."))
    sniff_bytes: Annotated[Size, Ge(64), Le(65536)] = field(default=16384, metadata=doc(
        "Most bytes looked at to decide a route."))
    server_first_wait: Duration = field(default=0.0, metadata=doc(
        "If > 0, a client that sends nothing for this long goes to the default route (server-speaks-first "
        "protocols such as SMTP); 0 waits the whole sniff_timeout."))
    trusted_proxies: list[CIDR] = field(default_factory=list, metadata=doc(
        "Senders whose PROXY v1/v2 header is accepted; from anyone else a PROXY header is an error."))
    max_connections: Annotated[int, Ge(1)] | None = field(default=None, metadata=doc(
        "Concurrent connections (UDP: sessions) per port of this listener."))
    backlog: Annotated[int, Ge(1)] = field(default=1024, metadata=doc("Accept queue length."))
    reuseport: bool = field(default=False, metadata=doc("Set SO_REUSEPORT (several processes on one port)."))
    idle_timeout: Duration = field(default=3600.0, metadata=doc(
        "Close a relayed connection idle for this long (judged once a second: never sooner, at most about two "
        "seconds later)."))
    udp_idle_timeout: Annotated[Duration, Gt(0)] = field(default=60.0, metadata=doc(
        "UDP binds: end a client's session (and free its upstream socket) after no datagram in either direction "
        "for this long (judged once a second: never sooner, at most about two seconds later)."))


@dataclass(frozen=True, kw_only=True)
class HealthCheck(_Options):
    """Active health check of every server of a pool."""

    http: str | None = field(default=None, metadata=doc(
        "Path for an HTTP GET check, e.g. \"/about/health\"; unset = TCP connect. https:// servers are checked "
        "over TLS with their service's upstream_tls."))
    port: Annotated[int, Ge(1), Le(65535)] | None = field(default=None, metadata=doc(
        "Port to check (default: the server's port)."))
    host: str | None = field(default=None, metadata=doc("Host header of the HTTP check (default: the server address)."))
    expect: Annotated[int, Ge(100), Le(599)] = field(default=200, metadata=doc("HTTP status that means healthy."))
    interval: Annotated[Duration, Gt(0)] = field(default=2.0, metadata=doc("Time between checks."))
    timeout: Annotated[Duration, Gt(0)] = field(default=1.0, metadata=doc("A check slower than this fails."))
    rise: Annotated[int, Ge(1)] = field(default=1, metadata=doc("Consecutive successes that mark a down server up."))
    fall: Annotated[int, Ge(1)] = field(default=1, metadata=doc("Consecutive failures that mark an up server down."))


@dataclass(frozen=True, kw_only=True)
class PassiveHealth(_Options):
    """Marking servers down from failures of real connections (never for a pool of one server:
    with nowhere else to go, marking it down would only refuse clients)."""

    failures: Annotated[int, Ge(1)] = field(default=3, metadata=doc(
        "Consecutive connect failures that mark a server down."))
    down_for: Annotated[Duration, Gt(0)] = field(default=10.0, metadata=doc("How long such a server stays down."))


def _check_address(v: str) -> str:
    parse_target(v)
    return v


@dataclass(frozen=True, kw_only=True)
class ServerSettings(_Options):
    address: Annotated[str, After(_check_address)] = field(metadata=doc("host:port, host (client's port) or unix:/path."))
    weight: Annotated[int, Ge(0), Le(1000)] = field(default=1, metadata=doc(
        "Share of new clients; 0 = backup-free drain."))
    drain: bool = field(default=False, metadata=doc("Take no new connections; established ones finish."))


def _check_servers(v: list[str | ServerSettings]) -> list[str | ServerSettings]:
    for item in v:
        if isinstance(item, str):
            parse_target(item)
    return v


@dataclass(frozen=True, kw_only=True)
class PoolSettings(_Options):
    """A set of servers that share the load."""

    servers: Annotated[list[str | ServerSettings], MinLen(1), After(_check_servers)] = field(metadata=doc("Servers: \"host:port\" or tables."))
    balance: Literal["round-robin", "least-connections", "source-hash"] = field(default="round-robin", metadata=doc(
        "How a server is picked; source-hash keeps a client on one server."))
    connect_timeout: Annotated[Duration, Gt(0)] = field(default=3.0, metadata=doc("Connect attempt limit per server."))
    retries: Annotated[int, Ge(0), Le(16)] = field(default=2, metadata=doc(
        "Other servers tried after a failed connect."))
    proxy_protocol: ProxyProtocol = field(default="off", metadata=doc("Send a PROXY header to the servers."))
    transparent: bool = field(default=False, metadata=doc(
        "Connect to the servers from the client's own address (IP_TRANSPARENT, TCP and UDP), so they see the "
        "client with no header. Needs CAP_NET_ADMIN and the return path of `edgeward nft`; the servers must route "
        "client addresses back through the edge."))
    health: HealthCheck | None = field(default=None, metadata=doc("Active health check; unset = none."))
    passive: PassiveHealth = field(default_factory=PassiveHealth, metadata=doc("Passive health."))


_PIN_RE = re.compile(r"^(?:sha256[:/=]\s*)?((?:[0-9a-fA-F]{2}:?){31}[0-9a-fA-F]{2})$")


def parse_pin(value: str) -> str:
    """A SHA-256 certificate fingerprint as openssl prints it (``AB:CD:…``, 32 bytes), with or without
    colons and an optional ``sha256:`` prefix → 64 lowercase hex digits."""
    m = _PIN_RE.match(value.strip())
    if m is None:
        raise ValueError(
            f"{value!r} is not a SHA-256 certificate fingerprint (print one with "
            "`openssl x509 -in cert.pem -noout -fingerprint -sha256` and paste the AB:CD:... part)"
        )
    return m.group(1).replace(":", "").lower()


def _check_pin(v: str | None) -> str | None:
    return None if v is None else parse_pin(v)


@dataclass(frozen=True, kw_only=True)
class UpstreamTlsSettings(_Options):
    """How the edge checks the certificate of an https:// upstream."""

    verify: bool = field(default=True, metadata=doc(
        "Check the upstream's certificate (against `ca`, or the system CAs). false accepts any certificate and is "
        "logged as a warning at start; prefer `ca` or `pin` for a self-signed upstream."))
    ca: str | None = field(default=None, metadata=doc(
        "PEM file of the CAs to trust for this upstream instead of the system ones; the upstream's own self-signed "
        "certificate works too."))
    pin: Annotated[str | None, After(_check_pin)] = field(default=None, metadata=doc(
        "SHA-256 fingerprint of the upstream's certificate (`openssl x509 -noout -fingerprint -sha256`: "
        "\"AB:CD:...\", colons optional). Without `ca` it replaces chain and name checks."))
    server_name: str | None = field(default=None, metadata=doc(
        "Name sent as SNI and checked in the certificate (default: the host of `to`)."))


def _check_redirect(v: str) -> str:
    if v.strip().lower() == "off":
        return "off"
    spec = parse_bind(v)
    if spec.transport != "tcp" or spec.first_port != spec.last_port:
        raise ValueError(f"{v!r}: the redirect listens on one TCP address (write e.g. \"[::]:80\" or \"off\")")
    return v


@dataclass(frozen=True, kw_only=True)
class HttpSettings(_Options):
    """The HTTP/1.1 reverse proxy: timeouts, limits, forwarded headers, the port-80 redirect."""

    header_timeout: Annotated[Duration, Gt(0)] = field(default=30.0, metadata=doc(
        "Longest time to receive a request head, from its first byte (or from the connection's start); a client "
        "that has sent part of one gets 408."))
    body_timeout: Annotated[Duration, Gt(0)] = field(default=60.0, metadata=doc(
        "Longest stall of a client: no request body byte while the edge waits for one, or no progress reading the "
        "response (408, or the connection is closed)."))
    response_timeout: Annotated[Duration, Gt(0)] = field(default=60.0, metadata=doc(
        "Longest wait for an upstream: for the response head after the request, and between reads of its body (504 "
        "before the head, else the connection is closed)."))
    keepalive_timeout: Annotated[Duration, Gt(0)] = field(default=60.0, metadata=doc(
        "How long an idle client keep-alive connection is kept between requests."))
    upgraded_timeout: Annotated[Duration, Gt(0)] = field(default=21600.0, metadata=doc(
        "Idle timeout of upgraded connections (WebSocket): no byte either way for this long closes them."))
    max_header_bytes: Annotated[Size, Ge(1024), Le(1048576)] = field(default=32768, metadata=doc(
        "Largest request head (request line and header fields); larger gets 431."))
    max_headers: Annotated[int, Ge(8), Le(1000)] = field(default=100, metadata=doc(
        "Most header fields in a request; more gets 431."))
    upstream_keepalive: Annotated[int, Ge(0), Le(10000)] = field(default=32, metadata=doc(
        "Idle keep-alive connections kept per upstream server (0 = a new connection for every request)."))
    upstream_idle_timeout: Annotated[Duration, Gt(0)] = field(default=30.0, metadata=doc(
        "How long an idle upstream keep-alive connection is kept (keep it below the upstream's own keep-alive "
        "timeout)."))
    trusted_proxies: list[CIDR] = field(default_factory=list, metadata=doc(
        "Clients (HTTP proxies or CDNs in front of the edge) whose X-Forwarded-For/-Proto/-Host, X-Real-IP and "
        "Forwarded headers are kept and appended to; from anyone else they are removed and replaced."))
    redirect: Annotated[str, After(_check_redirect)] = field(default="[::]:80", metadata=doc(
        "Where plain-HTTP clients of terminated names get a permanent redirect to https (except "
        "/.well-known/acme-challenge/, answered by the edge); \"off\" = no such listener."))


def _check_socket(v: str) -> str:
    p = v.strip()
    if not (p.startswith("/") or (p.startswith("@") and len(p) > 1)) or "\0" in p:
        raise ValueError(f"{v!r}: the handoff socket is an absolute path (\"/run/app/handoff.sock\") or "
                         "\"@name\" (abstract namespace)")
    if len(p.encode()) > 107:
        raise ValueError(f"{v!r}: a Unix socket path has at most 107 bytes")
    return p


@dataclass(frozen=True, kw_only=True)
class HandoffSettings(_Options):
    """A handoff endpoint: a Unix socket where a local server receives client sockets themselves
    (SCM_RIGHTS, with a record of what the edge sniffed; docs/handoff-protocol.md)."""

    socket: Annotated[str, After(_check_socket)] = field(metadata=doc(
        "Path of the endpoint's Unix socket (\"/run/app/handoff.sock\", or \"@name\" in the abstract namespace); "
        "the local server listens there (edgeward.handoff)."))
    ack_timeout: Annotated[Duration, Gt(0), Le(60)] = field(default=1.0, metadata=doc(
        "Longest wait for the server's acknowledgement; past it the client goes to the service's fallback (or is "
        "refused)."))
    max_in_flight: Annotated[int, Ge(1), Le(65536)] = field(default=64, metadata=doc(
        "Handoffs waiting for an acknowledgement at once; more go to the fallback at once."))


def _check_paths(v: list[str]) -> list[str]:
    out = []
    for path in v:
        p = path.strip()
        segments = p.split("/")
        if (not p.startswith("/") or any(c in p for c in "?#%\\ \t") or "//" in p
                or any(seg in (".", "..") for seg in segments)):
            raise ValueError(f"{path!r} is not a path prefix (write e.g. \"/http-bind\" or \"/colibri-ws/\")")
        out.append(p.rstrip("/") or "/")
    return out


def _check_names(v: list[str]) -> list[str]:
    out = []
    for name in v:
        n = name.strip().lower().rstrip(".")
        if not n or " " in n or (n.count("*") and not (n.startswith("*.") and n.count("*") == 1)):
            raise ValueError(f"{name!r} is not a name (write \"example.org\" or \"*.example.org\")")
        out.append(n)
    return out


@dataclass(frozen=True, kw_only=True)
class ServiceSettings(_Options):
    """Where clients arrive, which of them this service takes, and where they go."""

    listen: Annotated[list[str], MinLen(1)] = field(metadata=doc(
        "Listener names or addresses; \"udp/[::]:3478\" forwards UDP by session (routed by source only)."))
    names: Annotated[list[str], After(_check_names)] = field(default_factory=list, metadata=doc(
        "Names matched against SNI, HTTP Host or XMPP to=: exact or \"*.example.org\"."))
    protocol: Protocol | None = field(default=None, metadata=doc("Only clients speaking this protocol."))
    alpn: list[str] = field(default_factory=list, metadata=doc("Only TLS clients offering one of these ALPN ids."))
    source: list[CIDR] = field(default_factory=list, metadata=doc("Only clients from these networks."))
    to: str = field(metadata=doc(
        "An address (\"10.0.0.2:443\", \"10.0.0.2\" = same port), unix:/path, a pool name, a handoff endpoint name "
        "([handoffs.NAME]: the client socket itself is handed to a local server), or an HTTP upstream "
        "\"http://host[:port]\" / \"https://host[:port]\" (the edge then proxies HTTP requests)."))
    fallback: str | None = field(default=None, metadata=doc(
        "Services handing off only: an address or pool the client is relayed to when the handoff endpoint is down, "
        "busy, slow or refuses; unset = such clients are refused (TLS internal_error alert, HTTP 503)."))
    proxy_protocol: ProxyProtocol | None = field(default=None, metadata=doc(
        "Send a PROXY header (default: the pool's)."))
    transparent: bool | None = field(default=None, metadata=doc(
        "Connect upstream from the client's own address (default: the pool's `transparent`)."))
    connect_timeout: Duration | None = field(default=None, metadata=doc("Default 3s, or the pool's."))
    paths: Annotated[list[str], After(_check_paths)] = field(default_factory=list, metadata=doc(
        "HTTP services only: path prefixes this service takes (\"/http-bind\" takes /http-bind, /http-bind/x and "
        "/http-bind?x, not /http-binder); the longest match wins; default all paths."))
    upstream_tls: UpstreamTlsSettings | None = field(default=None, metadata=doc(
        "https:// upstreams only: how their certificate is checked (default: system CAs)."))
    forward: Literal["edge", "kernel"] = field(default="edge", metadata=doc(
        "\"kernel\": forwarded by nftables DNAT (table [kernel]), never entering edgeward: for heavy UDP and port "
        "ranges. The upstream sees the client's own address and must route its replies back through the edge (or "
        "set masquerade). No names, ALPN, protocol, PROXY header or HTTP: nothing is sniffed."))
    masquerade: bool = field(default=False, metadata=doc(
        "forward = \"kernel\" only: replace the client's address by the edge's (nftables masquerade), for an "
        "upstream whose replies would not come back through the edge."))


@dataclass(frozen=True, kw_only=True)
class BanIncrementSettings(_Options):
    """Growing bans, like fail2ban's bantime.increment / bantime.* options."""

    enabled: bool = field(default=True, metadata=doc("Grow the bans of addresses banned before."))
    factor: Annotated[float, Gt(0)] = field(default=1.0, metadata=doc(
        "bantime.factor: banFactor of the formula; also multiplies multipliers."))
    formula: str | None = field(default=None, metadata=doc(
        "bantime.formula (default: ban.Time * 2**min(ban.Count, 20) * banFactor). Arithmetic, comparisons, \"a if "
        "c else b\", min/max and the names ban.Time, ban.Count, banFactor only."))
    multipliers: list[float] = field(default_factory=list, metadata=doc(
        "bantime.multipliers, e.g. [1, 2, 4, 8, 16]: bantime * multipliers[min(count, len-1)] instead of the "
        "formula."))
    maxtime: Duration | None = field(default=None, metadata=doc("bantime.maxtime: the longest ban."))
    rndtime: Annotated[Duration, Ge(0)] = field(default=0.0, metadata=doc(
        "bantime.rndtime: up to this many random seconds added to each grown ban."))
    overalljails: bool = field(default=False, metadata=doc("bantime.overalljails: count earlier bans in every jail."))


@dataclass(frozen=True, kw_only=True)
class JailSettings(_Options):
    """A jail: sources + filter + thresholds + the listeners a ban protects. Defaults follow fail2ban's."""

    enabled: bool = field(default=True, metadata=doc("Run this jail."))
    logpath: list[str] = field(default_factory=list, metadata=doc("Log files to follow (tail -F: rotation-safe)."))
    sources: list[str] = field(default_factory=list, metadata=doc(
        "Other sources: \"edge:proto\" (protocol errors the edge sees), \"edge:sniff\", \"edge:conn\" (every "
        "connection: floods), \"edge:http401\" and \"edge:http403\" (those answers to HTTP requests), "
        "\"journal\" (the systemd journal, see journalmatch)."))
    journalmatch: list[str] = field(default_factory=list, metadata=doc(
        "journalctl matches of the \"journal\" source, e.g. [\"_SYSTEMD_UNIT=sshd.service\"] (default: the "
        "filter's own journalmatch)."))
    start: Literal["head", "tail"] = field(default="head", metadata=doc(
        "Where to begin a log file seen for the first time (no saved position): \"head\" reads it all (entries "
        "older than findtime are not counted), \"tail\" starts at its end."))
    filter: str | None = field(default=None, metadata=doc(
        "fail2ban filter by name (searched in guard.filter_dirs), with parameters like a fail2ban jail "
        "(\"sshd[mode=aggressive]\"), or a path."))
    failregex: list[str] = field(default_factory=list, metadata=doc(
        "Inline failregex lines with <HOST> (instead of a filter)."))
    ignoreregex: list[str] = field(default_factory=list, metadata=doc("Inline ignoreregex lines."))
    datepattern: str | None = field(default=None, metadata=doc(
        "Date pattern for inline regexes (default: auto-detect)."))
    maxlines: Annotated[int, Ge(1), Le(100)] = field(default=1, metadata=doc(
        "Lines matched together by inline regexes (multi-line failregex)."))
    logtimezone: str | None = field(default=None, metadata=doc(
        "fail2ban's logtimezone: the zone of log dates that carry none (\"UTC\", \"+0200\"); default: the edge's "
        "local zone."))
    maxretry: Annotated[int, Ge(1)] = field(default=5, metadata=doc("Failures within findtime that ban."))
    findtime: Annotated[Duration, Gt(0)] = field(default=600.0, metadata=doc("The window failures are counted in."))
    bantime: Duration = field(default=600.0, metadata=doc("Ban length; negative (-1) = forever; 0 is refused."))
    increment: BanIncrementSettings | None = field(default=None, metadata=doc("Growing bans; unset = fixed bantime."))
    ignoreip: list[CIDR] = field(default_factory=list, metadata=doc(
        "Addresses and networks never banned by this jail (guard.ignoreip is added)."))
    listeners: list[str] | None = field(default=None, metadata=doc(
        "Listeners (names or addresses) the ban protects; default all."))


def nft_table_name(v: str) -> str:
    """An nftables table name edgeward writes into scripts: letters, digits, '_' and '-' only."""
    if not v or not v.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"invalid nft table name {v!r} (letters, digits, '_' and '-' only)")
    return v


@dataclass(frozen=True, kw_only=True)
class NftSettings(_Options):
    """Mirror bans into an nftables set, so the kernel drops banned sources first.

    Only bans that protect every listener are mirrored (the kernel rule drops all of a
    source's traffic); bans limited to some listeners stay enforced at admit only."""

    enabled: bool = field(default=False, metadata=doc("Keep an nftables table of banned addresses."))
    table: Annotated[str, After(nft_table_name)] = field(default="edgeward", metadata=doc("Table name (family inet: one table for IPv4 and IPv6)."))
    hook: Literal["prerouting", "input"] = field(default="prerouting", metadata=doc(
        "Where banned sources are dropped: prerouting also drops traffic the host forwards (DNAT), input only "
        "traffic to local sockets."))
    priority: int = field(default=-300, metadata=doc(
        "Chain priority; -300 is before conntrack (-200), so banned sources create no conntrack entries."))
    command: Annotated[list[str], MinLen(1)] = field(default_factory=lambda: ["nft"], metadata=doc(
        "How to run nft, e.g. [\"ip\", \"netns\", \"exec\", \"ns1\", \"nft\"]."))
    timeout: Annotated[Duration, Gt(0)] = field(default=10.0, metadata=doc("Longest run of one nft command."))


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by "***", for errors, logs and status."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        u = urlsplit(url)
        if u.password is None:
            return url
        user = u.username or ""
        host = u.netloc.rsplit("@", 1)[1]
        return urlunsplit(u._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unreadable URL>"


def _check_redis(v: str | None) -> str | None:
    if v is None:
        return v
    from urllib.parse import urlsplit

    text = v.strip()
    shown = redact_url(text)  # the error is printed and logged: never with the password
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError as e:
        raise ValueError(f"cannot read {shown!r} as a Redis URL ({e})") from None
    if u.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"{shown!r}: a Redis URL starts with redis://, rediss:// (TLS) or unix:// "
            "(e.g. \"redis://127.0.0.1:6379/0\")"
        )
    if u.scheme == "unix":
        if not u.path.startswith("/"):
            raise ValueError(f"{shown!r}: give the socket's absolute path, e.g. \"unix:///run/redis/redis.sock\"")
    else:
        if not u.hostname:
            raise ValueError(f"{shown!r}: no host (write e.g. \"{u.scheme}://127.0.0.1:6379/0\")")
        db = u.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError(f"{shown!r}: the path is the database number (e.g. /0), not {u.path!r}")
        if port == 0:
            raise ValueError(f"{shown!r}: port 0")
    return text


def _check_name(v: str | None) -> str | None:
    if v is not None and (not v or any(c.isspace() or c in "\"{}" for c in v) or len(v) > 200):
        raise ValueError(f"{v!r}: a name without spaces, quotes or braces (at most 200 characters)")
    return v


@dataclass(frozen=True, kw_only=True)
class ShareSettings(_Options):
    """Bans shared between edge nodes through Redis: a ban or unban on one node holds on every node.

    Redis keeps the current bans (a hash) and recent unbans; changes reach the other nodes by
    pub/sub. A node that starts later, or comes back after Redis was away, merges both ways: it
    takes the bans it missed and publishes the bans it made meanwhile. While Redis is away every
    node keeps its own bans and keeps banning."""

    redis: Annotated[str | None, After(_check_redis)] = field(default=None, metadata=doc(
        "Redis URL: \"redis://[user:password@]host:port/db\", \"rediss://...\" (TLS) or "
        "\"unix:///run/redis/redis.sock?db=0\"; unset = bans are not shared."))
    password_file: str | None = field(default=None, metadata=doc(
        "File holding the Redis password (requirepass, or the ACL user's password), read at each connection; "
        "instead of a password in the URL."))
    ca_file: str | None = field(default=None, metadata=doc(
        "rediss:// only: PEM CA bundle trusted for the Redis server's certificate; unset = the system's."))
    cert_file: str | None = field(default=None, metadata=doc(
        "rediss:// only: PEM client certificate, for a Redis with tls-auth-clients yes (with key_file)."))
    key_file: str | None = field(default=None, metadata=doc(
        "rediss:// only: the client certificate's PEM private key."))
    node: Annotated[str | None, After(_check_name)] = field(default=None, metadata=doc(
        "This node's name, shown as the origin of its bans on the other nodes; unset = the host name."))
    prefix: Annotated[str, After(_check_name)] = field(default="edgeward", metadata=doc(
        "Prefix of the Redis keys and channel (\"<prefix>:bans\", ...): nodes with the same prefix share their "
        "bans; another prefix makes another group on the same Redis."))
    timeout: Annotated[Duration, Gt(0)] = field(default=3.0, metadata=doc(
        "Longest wait for connecting to Redis and for one command."))
    retry_min: Annotated[Duration, Gt(0)] = field(default=0.5, metadata=doc(
        "Wait before reconnecting after Redis was lost; doubles each failure."))
    retry_max: Annotated[Duration, Gt(0)] = field(default=30.0, metadata=doc(
        "Longest wait between reconnection attempts."))
    unban_retention: Annotated[Duration, Gt(0)] = field(default=7 * 86400.0, metadata=doc(
        "How long an unban is remembered (in Redis and on each node), so that a node cut off from Redis for less "
        "than this does not bring back a ban lifted meanwhile."))

    def __post_init__(self) -> None:
        from urllib.parse import urlsplit

        url = urlsplit(self.redis) if self.redis is not None else None
        if url is not None and url.password and self.password_file:
            raise ValueError("give the Redis password in the URL or in password_file, not both")
        tls_files = [n for n in ("ca_file", "cert_file", "key_file") if getattr(self, n) is not None]
        if tls_files and (url is None or url.scheme != "rediss"):
            raise ValueError(f"{', '.join(tls_files)}: only for a rediss:// (TLS) URL")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate and its key)")
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max must not be shorter than retry_min")


def _check_url(v: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(v.strip())
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        raise ValueError(f"lapi_url {v!r} is not an http:// or https:// URL like \"http://127.0.0.1:8080/\"")
    try:
        u.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"lapi_url {v!r} has an invalid port") from None
    return v.strip() if v.strip().endswith("/") else v.strip() + "/"


@dataclass(frozen=True, kw_only=True)
class CrowdSecSettings(_Options):
    """edgeward as a CrowdSec bouncer: decisions of the Local API (type ban, scopes Ip and Range)
    are enforced at admit like local bans. With machine credentials, this node's own bans are
    also sent to the LAPI as alerts. Names follow CrowdSec's bouncers (update_frequency,
    ca_cert_path, cert_path, key_path, insecure_skip_verify); read at start."""

    lapi_url: Annotated[str, After(_check_url)] = field(metadata=doc("The Local API, e.g. \"http://127.0.0.1:8080/\" (a bouncer's api_url)."))
    api_key: str | None = field(default=None, metadata=doc("The bouncer's API key (`cscli bouncers add NAME`)."))
    api_key_file: str | None = field(default=None, metadata=doc(
        "A file holding the API key (instead of api_key; surrounding whitespace is ignored)."))
    update_frequency: Annotated[Duration, Gt(0)] = field(default=10.0, metadata=doc(
        "How often the decision stream is polled."))
    max_backoff: Annotated[Duration, Gt(0)] = field(default=60.0, metadata=doc(
        "While the LAPI fails, polls back off (update_frequency doubled per failure) up to this; the last known "
        "decisions stay enforced meanwhile."))
    timeout: Annotated[Duration, Gt(0)] = field(default=5.0, metadata=doc(
        "Longest LAPI request. The start of the edge waits for the first poll at most this long."))
    origins: list[str] = field(default_factory=list, metadata=doc(
        "Only decisions of these origins (e.g. [\"crowdsec\", \"cscli\", \"CAPI\", \"lists\"]); empty = all."))
    scenarios_containing: list[str] = field(default_factory=list, metadata=doc(
        "Only decisions whose scenario contains one of these words."))
    scenarios_not_containing: list[str] = field(default_factory=list, metadata=doc(
        "No decision whose scenario contains one of these words."))
    ca_cert_path: str | None = field(default=None, metadata=doc(
        "CA certificate (PEM) the LAPI's certificate must chain to."))
    cert_path: str | None = field(default=None, metadata=doc(
        "Client certificate (PEM) for TLS authentication to the LAPI (with key_path)."))
    key_path: str | None = field(default=None, metadata=doc("Key of cert_path (PEM, unencrypted)."))
    insecure_skip_verify: bool = field(default=False, metadata=doc(
        "Accept any LAPI certificate (tests only: anyone on the path can feed decisions)."))
    machine_id: str | None = field(default=None, metadata=doc(
        "A machine (watcher) login, e.g. from `cscli machines add NAME --password ...`: with it, this node's jail "
        "bans are sent to the LAPI as alerts."))
    password: str | None = field(default=None, metadata=doc("The machine's password."))
    password_file: str | None = field(default=None, metadata=doc(
        "A file holding the machine's password (instead of password)."))
    alert_origin: Annotated[str, MinLen(1)] = field(default="crowdsec", metadata=doc(
        "Origin of the decisions sent with alerts. \"crowdsec\" (what a CrowdSec agent's own decisions carry) is "
        "listed by `cscli decisions list` and `cscli alerts list`; any other origin only with --all. The scenario "
        "is \"edgeward/<jail>\"."))

    def __post_init__(self) -> None:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give api_key or api_key_file, not both")
        if (self.cert_path is None) != (self.key_path is None):
            raise ValueError("cert_path and key_path go together (TLS client authentication)")
        if self.api_key is None and self.api_key_file is None and self.cert_path is None:
            raise ValueError("needs api_key or api_key_file (`cscli bouncers add NAME` prints a key), "
                             "or cert_path and key_path")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty")
        if self.cert_path is not None and not self.lapi_url.startswith("https://"):
            raise ValueError("cert_path needs an https:// lapi_url")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        has_password = self.password is not None or self.password_file is not None
        if self.machine_id is not None and not has_password:
            raise ValueError("machine_id needs password or password_file")
        if self.machine_id is None and has_password:
            raise ValueError("password needs machine_id")


@dataclass(frozen=True, kw_only=True)
class GuardSettings(_Options):
    """Settings shared by all jails."""

    ignoreip: list[CIDR] = field(default_factory=list, metadata=doc("Addresses and networks no jail bans."))
    filter_dirs: list[str] = field(default_factory=lambda: ["/etc/fail2ban/filter.d"], metadata=doc(
        "Where filters named without a path are searched, in order; /etc/fail2ban/filter.d and edgeward's own "
        "filters are searched after these."))
    db_synchronous: Literal["NORMAL", "FULL"] = field(default="NORMAL", metadata=doc(
        "SQLite durability of the ban store (edge.state_dir/guard.sqlite): NORMAL survives kill -9, FULL also "
        "power loss (one more fsync per ban)."))
    match_isolation: Literal["process", "thread", "inline"] = field(default="process", metadata=doc(
        "Where jail filters run. \"process\": in a matcher process beside the edge, so a regex that backtracks "
        "catastrophically cannot freeze the data plane, and each batch of lines is bounded by match_timeout. "
        "\"thread\": on a thread of the edge (no extra process, but Python's re holds the interpreter while "
        "matching, so a runaway regex stalls the edge, unbounded). \"inline\": on the event loop itself (tests and "
        "benchmarks only: every match delays the data plane)."))
    match_timeout: Annotated[Duration, Gt(0)] = field(default=2.0, metadata=doc(
        "Deadline of one batch of log lines in the matcher process (match_isolation = \"process\"). Past it the "
        "process is killed and restarted, the batch dropped and counted in the jail's filter_timeouts."))
    poll_interval: Annotated[Duration, Gt(0)] = field(default=0.25, metadata=doc(
        "Log polling period where inotify is missing (and while a log's directory is missing)."))
    use_inotify: bool = field(default=True, metadata=doc("Wake on inotify events; false polls every poll_interval."))
    max_tracked: Annotated[int, Ge(1)] = field(default=100000, metadata=doc(
        "Addresses counted per jail before the least recently seen is forgotten (bounds memory under a flood of "
        "spoofed sources)."))
    history_max_age: Annotated[Duration, Gt(0)] = field(default=7 * 86400.0, metadata=doc(
        "How long past bans count for growing bans (older history is purged)."))
    nft: NftSettings = field(default_factory=NftSettings, metadata=doc("nftables mirror of bans."))
    share: ShareSettings = field(default_factory=ShareSettings, metadata=doc("Bans shared between edge nodes (Redis)."))
    crowdsec: CrowdSecSettings | None = field(default=None, metadata=doc(
        "Enforce a CrowdSec Local API's decisions (unset: not a bouncer)."))


@dataclass(frozen=True, kw_only=True)
class CertificateFiles(_Options):
    """A certificate chain and its key, from PEM files."""

    cert: str = field(metadata=doc("PEM chain: the certificate first, then its intermediates."))
    key: str = field(metadata=doc("PEM private key (RSA >= 2048 bits or ECDSA), unencrypted; mode 0600 or 0640."))


def _check_default(v: str | None) -> str | None:
    if v is None:
        return v
    n = v.strip().lower().rstrip(".")
    if not n or " " in n or "*" in n:
        raise ValueError(f"{v!r} is not a name (write the DNS name whose certificate is the default)")
    return n


@dataclass(frozen=True, kw_only=True)
class TlsSettings(_Options):
    """TLS termination: certificates from files (ACME certificates are added by name)."""

    certificates: list[CertificateFiles] = field(default_factory=list, metadata=doc(
        "Certificates from files, chosen by SNI against their subjectAltName DNS names (exact names before "
        "\"*.example.org\" wildcards, which cover one label)."))
    default_certificate: Annotated[str | None, After(_check_default)] = field(default=None, metadata=doc(
        "A name whose certificate (from a file or ACME) is served to clients whose SNI no certificate covers, or "
        "who send none; unset = such handshakes are refused (unrecognized_name alert)."))
    min_version: Literal["1.2", "1.3"] = field(default="1.2", metadata=doc("Oldest TLS version accepted."))


def _check_directory(v: str) -> str:
    if not v.startswith("https://"):
        raise ValueError(f"{v!r}: an ACME directory is an https:// URL (RFC 8555 6.1)")
    return v


@dataclass(frozen=True, kw_only=True)
class AcmeSettings(_Options):
    """Certificates from an ACME CA (Let's Encrypt by default) for the names the edge terminates."""

    enabled: bool = field(default=True, metadata=doc(
        "Get certificates from the ACME CA for every name of an HTTP service that no [tls] certificate covers "
        "(names that cannot have a public certificate, such as IP addresses and wildcards, are listed as "
        "unsupported in `edgeward status`); false = file certificates only."))
    email: str | None = field(default=None, metadata=doc(
        "Contact address of the ACME account (expiry notices); optional."))
    directory: Annotated[str, After(_check_directory)] = field(default="https://acme-v02.api.letsencrypt.org/directory", metadata=doc(
        "ACME directory URL. Let's Encrypt staging: https://acme-staging-v02.api.letsencrypt.org/directory."))
    ca_file: str | None = field(default=None, metadata=doc(
        "PEM CA bundle trusted for the directory's HTTPS (a private CA, or pebble in tests); unset = the system's."))
    challenges: Annotated[list[AcmeChallenge], MinLen(1)] = field(default_factory=lambda: list[AcmeChallenge](["http-01", "tls-alpn-01"]), metadata=doc(
        "Challenge types, in order of preference; after a failed attempt the next one is tried. http-01 needs port "
        "80 reaching the edge, tls-alpn-01 port 443."))
    key_type: Literal["ecdsa-p256", "ecdsa-p384", "rsa2048", "rsa4096"] = field(default="ecdsa-p256", metadata=doc(
        "Key of each certificate (a new key at every renewal)."))
    renew_before: Annotated[Duration, Gt(0)] | None = field(default=None, metadata=doc(
        "Renew this long before expiry; unset = when renew_fraction of the lifetime remains."))
    renew_fraction: Annotated[float, Gt(0), Lt(1)] = field(default=1 / 3, metadata=doc(
        "Renew when this fraction of a certificate's lifetime remains (1/3: day 60 of 90)."))
    retry_min: Annotated[Duration, Gt(0)] = field(default=60.0, metadata=doc(
        "Wait after a first failed attempt; doubles with each failure."))
    retry_max: Annotated[Duration, Gt(0)] = field(default=86400.0, metadata=doc(
        "Longest wait between attempts for a failing name."))
    order_timeout: Annotated[Duration, Gt(0)] = field(default=120.0, metadata=doc(
        "Longest an order may take from creation to certificate."))
    concurrency: Annotated[int, Ge(1), Le(16)] = field(default=2, metadata=doc(
        "Orders in flight at once (each on a worker thread)."))

    def __post_init__(self) -> None:
        if self.retry_min > self.retry_max:
            raise ValueError("retry_min is longer than retry_max")


@dataclass(frozen=True, kw_only=True)
class KernelSettings(_Options):
    """The nftables table of services with forward = "kernel" (DNAT, and masquerade where asked)."""

    table: Annotated[str, After(nft_table_name)] = field(default="edgeward_fwd", metadata=doc(
        "Table name (family inet); edgeward owns it and touches no other."))
    command: Annotated[list[str], MinLen(1)] = field(default_factory=lambda: ["nft"], metadata=doc(
        "How to run nft, e.g. [\"ip\", \"netns\", \"exec\", \"ns1\", \"nft\"]."))
    timeout: Annotated[Duration, Gt(0)] = field(default=10.0, metadata=doc("Longest run of one nft command."))


@dataclass(frozen=True, kw_only=True)
class Config(_Options):
    """The whole file."""

    edge: EdgeSettings = field(default_factory=EdgeSettings)
    listeners: dict[str, ListenerSettings] = field(default_factory=dict)
    pools: dict[str, PoolSettings] = field(default_factory=dict)
    handoffs: dict[str, HandoffSettings] = field(default_factory=dict, metadata=doc(
        "Handoff endpoints: local servers that receive client sockets."))
    services: dict[str, ServiceSettings] = field(default_factory=dict)
    guard: GuardSettings = field(default_factory=GuardSettings, metadata=doc("Shared jail settings."))
    jails: dict[str, JailSettings] = field(default_factory=dict, metadata=doc("Jails that ban at the edge."))
    tls: TlsSettings = field(default_factory=TlsSettings, metadata=doc("TLS termination."))
    acme: AcmeSettings = field(default_factory=AcmeSettings, metadata=doc("ACME certificates."))
    http: HttpSettings = field(default_factory=HttpSettings, metadata=doc("The HTTP reverse proxy."))
    kernel: KernelSettings = field(default_factory=KernelSettings, metadata=doc("Kernel forwarding (nftables DNAT)."))


def json_schema() -> dict[str, object]:
    """The schema as JSON Schema (`edgeward schema`): pydantic is imported here, never by the daemon."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(Config).json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "edgeward configuration"
    return schema
