"""The config schema: the one description of every option, its default, unit and help.

`edgeward schema` prints it as JSON Schema; docs/config.md shows it in use.
Models forbid unknown keys so that a typo is an error with a location, not a
silently ignored option.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .units import CIDR, Duration, Size, parse_bind, parse_target

ProxyProtocol = Literal["off", "v1", "v2"]
Protocol = Literal["tls", "http", "xmpp", "ssh", "unknown"]
AcmeChallenge = Literal["http-01", "tls-alpn-01"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EdgeSettings(_Strict):
    """Process-wide settings."""

    admin: str = Field(
        "127.0.0.1:9901",
        description="Admin API address: \"unix:/path\" or host:port. Loopback or a Unix socket "
        "unless admin_token is set.",
    )
    admin_token: str | None = Field(
        None, description="Bearer token the admin API requires; mandatory for a non-loopback admin address."
    )
    state_dir: str = Field("/var/lib/edgeward", description="Where bans and log positions are kept.")
    max_connections: int = Field(20000, ge=1, description="Global limit of concurrent TCP connections.")
    max_connections_per_client: int = Field(
        512, ge=0, description="Concurrent TCP connections one client address may hold (0 = no limit)."
    )
    max_udp_sessions: int = Field(20000, ge=1, description="Global limit of live UDP sessions (one upstream socket each).")
    max_udp_sessions_per_client: int = Field(
        512, ge=0, description="Live UDP sessions one client address may hold over all UDP ports (0 = no limit)."
    )
    drain_timeout: Duration = Field(30.0, description="On SIGTERM, how long established connections may finish.")
    nofile: int | Literal["max"] = Field(
        "max", description="Open-files soft limit to set at start (\"max\" = the hard limit)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    splice: bool = Field(True, description="Relay with splice() (zero-copy) where the OS has it.")
    access_log: str | None = Field(
        None,
        description="Write one line per closed TCP connection and ended UDP session (client, service, upstream, "
        "bytes, duration, end reason) to this file (\"-\" = standard output, \"stderr\" = standard error); unset = no access log. "
        "Reopened on SIGUSR1 and on reload, so logrotate's move + `kill -USR1` (or `edgeward reload`) works.",
    )
    access_log_format: Literal["text", "json"] = Field(
        "text", description="Access log lines as logfmt text (key=value) or JSON objects."
    )
    workers: int | Literal["auto"] = Field(
        1,
        description="Data-plane processes (like nginx's worker_processes, HAProxy's nbthread). 1 = one process "
        "doing everything. N > 1: a master keeps the control plane (config, reload, health checks, guard, ACME, "
        "admin API) and N workers accept on SO_REUSEPORT sockets the master holds; \"auto\" = one per CPU.",
    )

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError(f"workers = {v}: between 1 and 256, or \"auto\" (one per CPU)")
        return v


class ListenerSettings(_Strict):
    """A named listener: addresses shared by services, with socket and sniffing options."""

    bind: list[str] = Field(..., min_length=1, description="Addresses: \"[::]:443\", \"0.0.0.0:10000-10100\", \"udp/[::]:3478\".")
    sniff_timeout: Duration = Field(5.0, description="Longest wait for the first bytes to decide a route.")
    sniff_bytes: Size = Field(16384, ge=64, le=65536, description="Most bytes looked at to decide a route.")
    server_first_wait: Duration = Field(
        0.0,
        description="If > 0, a client that sends nothing for this long goes to the default route "
        "(server-speaks-first protocols such as SMTP); 0 waits the whole sniff_timeout.",
    )
    trusted_proxies: list[CIDR] = Field(
        default_factory=list,
        description="Senders whose PROXY v1/v2 header is accepted; from anyone else a PROXY header is an error.",
    )
    max_connections: int | None = Field(None, ge=1, description="Concurrent connections (UDP: sessions) per port of this listener.")
    backlog: int = Field(1024, ge=1, description="Accept queue length.")
    reuseport: bool = Field(False, description="Set SO_REUSEPORT (several processes on one port).")
    idle_timeout: Duration = Field(3600.0, description="Close a relayed connection idle for this long.")
    udp_idle_timeout: Duration = Field(
        60.0, gt=0,
        description="UDP binds: end a client's session (and free its upstream socket) after no datagram in "
        "either direction for this long; checked once a second.",
    )

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, v: list[str]) -> list[str]:
        for item in v:
            parse_bind(item)
        return v


class HealthCheck(_Strict):
    """Active health check of every server of a pool."""

    http: str | None = Field(None, description="Path for an HTTP GET check, e.g. \"/about/health\"; unset = TCP "
                             "connect. https:// servers are checked over TLS with their service's upstream_tls.")
    port: int | None = Field(None, ge=1, le=65535, description="Port to check (default: the server's port).")
    host: str | None = Field(None, description="Host header of the HTTP check (default: the server address).")
    expect: int = Field(200, ge=100, le=599, description="HTTP status that means healthy.")
    interval: Duration = Field(2.0, gt=0, description="Time between checks.")
    timeout: Duration = Field(1.0, gt=0, description="A check slower than this fails.")
    rise: int = Field(1, ge=1, description="Consecutive successes that mark a down server up.")
    fall: int = Field(1, ge=1, description="Consecutive failures that mark an up server down.")


class PassiveHealth(_Strict):
    """Marking servers down from failures of real connections (never for a pool of one server:
    with nowhere else to go, marking it down would only refuse clients)."""

    failures: int = Field(3, ge=1, description="Consecutive connect failures that mark a server down.")
    down_for: Duration = Field(10.0, gt=0, description="How long such a server stays down.")


class ServerSettings(_Strict):
    address: str = Field(..., description="host:port, host (client's port) or unix:/path.")
    weight: int = Field(1, ge=0, le=1000, description="Share of new clients; 0 = backup-free drain.")
    drain: bool = Field(False, description="Take no new connections; established ones finish.")

    @field_validator("address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        parse_target(v)
        return v


class PoolSettings(_Strict):
    """A set of servers that share the load."""

    servers: list[str | ServerSettings] = Field(..., min_length=1, description="Servers: \"host:port\" or tables.")
    balance: Literal["round-robin", "least-connections", "source-hash"] = Field(
        "round-robin", description="How a server is picked; source-hash keeps a client on one server."
    )
    connect_timeout: Duration = Field(3.0, gt=0, description="Connect attempt limit per server.")
    retries: int = Field(2, ge=0, le=16, description="Other servers tried after a failed connect.")
    proxy_protocol: ProxyProtocol = Field("off", description="Send a PROXY header to the servers.")
    transparent: bool = Field(
        False,
        description="Connect to the servers from the client's own address (IP_TRANSPARENT, TCP and UDP), so "
        "they see the client with no header. Needs CAP_NET_ADMIN and the return path of `edgeward nft`; the "
        "servers must route client addresses back through the edge.",
    )
    health: HealthCheck | None = Field(None, description="Active health check; unset = none.")
    passive: PassiveHealth = Field(default_factory=lambda: PassiveHealth.model_validate({}), description="Passive health.")

    @field_validator("servers")
    @classmethod
    def _check_servers(cls, v: list[str | ServerSettings]) -> list[str | ServerSettings]:
        for item in v:
            if isinstance(item, str):
                parse_target(item)
        return v


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


class UpstreamTlsSettings(_Strict):
    """How the edge checks the certificate of an https:// upstream."""

    verify: bool = Field(
        True,
        description="Check the upstream's certificate (against `ca`, or the system CAs). false accepts any "
        "certificate and is logged as a warning at start; prefer `ca` or `pin` for a self-signed upstream.",
    )
    ca: str | None = Field(
        None,
        description="PEM file of the CAs to trust for this upstream instead of the system ones; the upstream's "
        "own self-signed certificate works too.",
    )
    pin: str | None = Field(
        None,
        description="SHA-256 fingerprint of the upstream's certificate (`openssl x509 -noout -fingerprint "
        "-sha256`: \"AB:CD:...\", colons optional). Without `ca` it replaces chain and name checks.",
    )
    server_name: str | None = Field(
        None,
        description="Name sent as SNI and checked in the certificate (default: the host of `to`).",
    )

    @field_validator("pin")
    @classmethod
    def _check_pin(cls, v: str | None) -> str | None:
        return None if v is None else parse_pin(v)


class HttpSettings(_Strict):
    """The HTTP/1.1 reverse proxy: timeouts, limits, forwarded headers, the port-80 redirect."""

    header_timeout: Duration = Field(
        30.0, gt=0, description="Longest time to receive a request head, from its first byte (or from the "
        "connection's start); a client that has sent part of one gets 408.",
    )
    body_timeout: Duration = Field(
        60.0, gt=0, description="Longest stall of a client: no request body byte while the edge waits for one, "
        "or no progress reading the response (408, or the connection is closed).",
    )
    response_timeout: Duration = Field(
        60.0, gt=0, description="Longest wait for an upstream: for the response head after the request, and "
        "between reads of its body (504 before the head, else the connection is closed).",
    )
    keepalive_timeout: Duration = Field(
        60.0, gt=0, description="How long an idle client keep-alive connection is kept between requests.",
    )
    upgraded_timeout: Duration = Field(
        21600.0, gt=0, description="Idle timeout of upgraded connections (WebSocket): no byte either way for "
        "this long closes them.",
    )
    max_header_bytes: Size = Field(
        32768, ge=1024, le=1048576, description="Largest request head (request line and header fields); "
        "larger gets 431.",
    )
    max_headers: int = Field(100, ge=8, le=1000, description="Most header fields in a request; more gets 431.")
    upstream_keepalive: int = Field(
        32, ge=0, le=10000, description="Idle keep-alive connections kept per upstream server (0 = a new "
        "connection for every request).",
    )
    upstream_idle_timeout: Duration = Field(
        30.0, gt=0, description="How long an idle upstream keep-alive connection is kept (keep it below the "
        "upstream's own keep-alive timeout).",
    )
    trusted_proxies: list[CIDR] = Field(
        default_factory=list,
        description="Clients (HTTP proxies or CDNs in front of the edge) whose X-Forwarded-For/-Proto/-Host, "
        "X-Real-IP and Forwarded headers are kept and appended to; from anyone else they are removed and "
        "replaced.",
    )
    redirect: str = Field(
        "[::]:80",
        description="Where plain-HTTP clients of terminated names get a permanent redirect to https (except "
        "/.well-known/acme-challenge/, answered by the edge); \"off\" = no such listener.",
    )

    @field_validator("redirect")
    @classmethod
    def _check_redirect(cls, v: str) -> str:
        if v.strip().lower() == "off":
            return "off"
        spec = parse_bind(v)
        if spec.transport != "tcp" or spec.first_port != spec.last_port:
            raise ValueError(f"{v!r}: the redirect listens on one TCP address (write e.g. \"[::]:80\" or \"off\")")
        return v


class HandoffSettings(_Strict):
    """A handoff endpoint: a Unix socket where a local server receives client sockets themselves
    (SCM_RIGHTS, with a record of what the edge sniffed; docs/handoff-protocol.md)."""

    socket: str = Field(
        ..., description="Path of the endpoint's Unix socket (\"/run/app/handoff.sock\", or \"@name\" in the "
        "abstract namespace); the local server listens there (edgeward.handoff).",
    )
    ack_timeout: Duration = Field(
        1.0, gt=0, le=60,
        description="Longest wait for the server's acknowledgement; past it the client goes to the service's "
        "fallback (or is refused).",
    )
    max_in_flight: int = Field(
        64, ge=1, le=65536,
        description="Handoffs waiting for an acknowledgement at once; more go to the fallback at once.",
    )

    @field_validator("socket")
    @classmethod
    def _check_socket(cls, v: str) -> str:
        p = v.strip()
        if not (p.startswith("/") or (p.startswith("@") and len(p) > 1)) or "\0" in p:
            raise ValueError(f"{v!r}: the handoff socket is an absolute path (\"/run/app/handoff.sock\") or "
                             "\"@name\" (abstract namespace)")
        if len(p.encode()) > 107:
            raise ValueError(f"{v!r}: a Unix socket path has at most 107 bytes")
        return p


class ServiceSettings(_Strict):
    """Where clients arrive, which of them this service takes, and where they go."""

    listen: list[str] = Field(
        ..., min_length=1,
        description="Listener names or addresses; \"udp/[::]:3478\" forwards UDP by session (routed by source only).",
    )
    names: list[str] = Field(
        default_factory=list,
        description="Names matched against SNI, HTTP Host or XMPP to=: exact or \"*.example.org\".",
    )
    protocol: Protocol | None = Field(None, description="Only clients speaking this protocol.")
    alpn: list[str] = Field(default_factory=list, description="Only TLS clients offering one of these ALPN ids.")
    source: list[CIDR] = Field(default_factory=list, description="Only clients from these networks.")
    to: str = Field(
        ..., description="An address (\"10.0.0.2:443\", \"10.0.0.2\" = same port), unix:/path, a pool name, a "
        "handoff endpoint name ([handoffs.NAME]: the client socket itself is handed to a local server), or an "
        "HTTP upstream \"http://host[:port]\" / \"https://host[:port]\" (the edge then proxies HTTP requests).",
    )
    fallback: str | None = Field(
        None,
        description="Services handing off only: an address or pool the client is relayed to when the handoff "
        "endpoint is down, busy, slow or refuses; unset = such clients are refused (TLS internal_error alert, "
        "HTTP 503).",
    )
    proxy_protocol: ProxyProtocol | None = Field(None, description="Send a PROXY header (default: the pool's).")
    transparent: bool | None = Field(
        None, description="Connect upstream from the client's own address (default: the pool's `transparent`).",
    )
    connect_timeout: Duration | None = Field(None, description="Default 3s, or the pool's.")
    paths: list[str] = Field(
        default_factory=list,
        description="HTTP services only: path prefixes this service takes (\"/http-bind\" takes /http-bind, "
        "/http-bind/x and /http-bind?x, not /http-binder); the longest match wins; default all paths.",
    )
    upstream_tls: UpstreamTlsSettings | None = Field(
        None, description="https:// upstreams only: how their certificate is checked (default: system CAs)."
    )
    forward: Literal["edge", "kernel"] = Field(
        "edge",
        description="\"kernel\": forwarded by nftables DNAT (table [kernel]), never entering edgeward: for heavy UDP "
        "and port ranges. The upstream sees the client's own address and must route its replies back through "
        "the edge (or set masquerade). No names, ALPN, protocol, PROXY header or HTTP: nothing is sniffed.",
    )
    masquerade: bool = Field(
        False,
        description="forward = \"kernel\" only: replace the client's address by the edge's (nftables masquerade), "
        "for an upstream whose replies would not come back through the edge.",
    )

    @field_validator("paths")
    @classmethod
    def _check_paths(cls, v: list[str]) -> list[str]:
        out = []
        for path in v:
            p = path.strip()
            segments = p.split("/")
            if (not p.startswith("/") or any(c in p for c in "?#%\\ \t") or "//" in p
                    or any(seg in (".", "..") for seg in segments)):
                raise ValueError(f"{path!r} is not a path prefix (write e.g. \"/http-bind\" or \"/colibri-ws/\")")
            out.append(p.rstrip("/") or "/")
        return out

    @field_validator("names")
    @classmethod
    def _check_names(cls, v: list[str]) -> list[str]:
        out = []
        for name in v:
            n = name.strip().lower().rstrip(".")
            if not n or " " in n or (n.count("*") and not (n.startswith("*.") and n.count("*") == 1)):
                raise ValueError(f"{name!r} is not a name (write \"example.org\" or \"*.example.org\")")
            out.append(n)
        return out


class BanIncrementSettings(_Strict):
    """Growing bans, like fail2ban's bantime.increment / bantime.* options."""

    enabled: bool = Field(True, description="Grow the bans of addresses banned before.")
    factor: float = Field(1.0, gt=0, description="bantime.factor: banFactor of the formula; also multiplies multipliers.")
    formula: str | None = Field(
        None,
        description="bantime.formula (default: ban.Time * 2**min(ban.Count, 20) * banFactor). Arithmetic, "
        "comparisons, \"a if c else b\", min/max and the names ban.Time, ban.Count, banFactor only.",
    )
    multipliers: list[float] = Field(
        default_factory=list,
        description="bantime.multipliers, e.g. [1, 2, 4, 8, 16]: bantime * multipliers[min(count, len-1)] "
        "instead of the formula.",
    )
    maxtime: Duration | None = Field(None, description="bantime.maxtime: the longest ban.")
    rndtime: Duration = Field(
        0.0, ge=0, description="bantime.rndtime: up to this many random seconds added to each grown ban."
    )
    overalljails: bool = Field(False, description="bantime.overalljails: count earlier bans in every jail.")


class JailSettings(_Strict):
    """A jail: sources + filter + thresholds + the listeners a ban protects. Defaults follow fail2ban's."""

    enabled: bool = Field(True, description="Run this jail.")
    logpath: list[str] = Field(default_factory=list, description="Log files to follow (tail -F: rotation-safe).")
    sources: list[str] = Field(
        default_factory=list,
        description="Other sources: \"edge:proto\" (protocol errors the edge sees), \"edge:sniff\", "
        "\"edge:conn\" (every connection: floods), \"journal\" (the systemd journal, see journalmatch).",
    )
    journalmatch: list[str] = Field(
        default_factory=list,
        description="journalctl matches of the \"journal\" source, e.g. [\"_SYSTEMD_UNIT=sshd.service\"] "
        "(default: the filter's own journalmatch).",
    )
    start: Literal["head", "tail"] = Field(
        "head",
        description="Where to begin a log file seen for the first time (no saved position): \"head\" reads it "
        "all (entries older than findtime are not counted), \"tail\" starts at its end.",
    )
    filter: str | None = Field(
        None,
        description="fail2ban filter by name (searched in guard.filter_dirs), with parameters like a "
        "fail2ban jail (\"sshd[mode=aggressive]\"), or a path.",
    )
    failregex: list[str] = Field(
        default_factory=list, description="Inline failregex lines with <HOST> (instead of a filter)."
    )
    ignoreregex: list[str] = Field(default_factory=list, description="Inline ignoreregex lines.")
    datepattern: str | None = Field(None, description="Date pattern for inline regexes (default: auto-detect).")
    maxlines: int = Field(1, ge=1, le=100, description="Lines matched together by inline regexes (multi-line failregex).")
    logtimezone: str | None = Field(
        None,
        description="fail2ban's logtimezone: the zone of log dates that carry none (\"UTC\", \"+0200\"); "
        "default: the edge's local zone.",
    )
    maxretry: int = Field(5, ge=1, description="Failures within findtime that ban.")
    findtime: Duration = Field(600.0, gt=0, description="The window failures are counted in.")
    bantime: Duration = Field(600.0, description="Ban length; negative (-1) = forever; 0 is refused.")
    increment: BanIncrementSettings | None = Field(None, description="Growing bans; unset = fixed bantime.")
    ignoreip: list[CIDR] = Field(
        default_factory=list,
        description="Addresses and networks never banned by this jail (guard.ignoreip is added).",
    )
    listeners: list[str] | None = Field(None, description="Listeners (names or addresses) the ban protects; default all.")


def nft_table_name(v: str) -> str:
    """An nftables table name edgeward writes into scripts: letters, digits, '_' and '-' only."""
    if not v or not v.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"invalid nft table name {v!r} (letters, digits, '_' and '-' only)")
    return v


class NftSettings(_Strict):
    """Mirror bans into an nftables set, so the kernel drops banned sources first.

    Only bans that protect every listener are mirrored (the kernel rule drops all of a
    source's traffic); bans limited to some listeners stay enforced at admit only."""

    enabled: bool = Field(False, description="Keep an nftables table of banned addresses.")
    table: str = Field("edgeward", description="Table name (family inet: one table for IPv4 and IPv6).")
    hook: Literal["prerouting", "input"] = Field(
        "prerouting",
        description="Where banned sources are dropped: prerouting also drops traffic the host forwards "
        "(DNAT), input only traffic to local sockets.",
    )
    priority: int = Field(
        -300, description="Chain priority; -300 is before conntrack (-200), so banned sources create no conntrack entries."
    )
    command: list[str] = Field(
        default_factory=lambda: ["nft"], min_length=1,
        description="How to run nft, e.g. [\"ip\", \"netns\", \"exec\", \"ns1\", \"nft\"].",
    )
    timeout: Duration = Field(10.0, gt=0, description="Longest run of one nft command.")

    @field_validator("table")
    @classmethod
    def _check_table(cls, v: str) -> str:
        return nft_table_name(v)


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


class ShareSettings(_Strict):
    """Bans shared between edge nodes through Redis: a ban or unban on one node holds on every node.

    Redis keeps the current bans (a hash) and recent unbans; changes reach the other nodes by
    pub/sub. A node that starts later, or comes back after Redis was away, merges both ways: it
    takes the bans it missed and publishes the bans it made meanwhile. While Redis is away every
    node keeps its own bans and keeps banning."""

    redis: str | None = Field(
        None,
        description="Redis URL: \"redis://[user:password@]host:port/db\", \"rediss://...\" (TLS) or "
        "\"unix:///run/redis/redis.sock?db=0\"; unset = bans are not shared.",
    )
    password_file: str | None = Field(
        None,
        description="File holding the Redis password (requirepass, or the ACL user's password), read at each "
        "connection; instead of a password in the URL.",
    )
    ca_file: str | None = Field(
        None, description="rediss:// only: PEM CA bundle trusted for the Redis server's certificate; unset = the system's.",
    )
    cert_file: str | None = Field(
        None, description="rediss:// only: PEM client certificate, for a Redis with tls-auth-clients yes (with key_file).",
    )
    key_file: str | None = Field(None, description="rediss:// only: the client certificate's PEM private key.")
    node: str | None = Field(
        None,
        description="This node's name, shown as the origin of its bans on the other nodes; unset = the host name.",
    )
    prefix: str = Field(
        "edgeward",
        description="Prefix of the Redis keys and channel (\"<prefix>:bans\", ...): nodes with the same prefix "
        "share their bans; another prefix makes another group on the same Redis.",
    )
    timeout: Duration = Field(3.0, gt=0, description="Longest wait for connecting to Redis and for one command.")
    retry_min: Duration = Field(0.5, gt=0, description="Wait before reconnecting after Redis was lost; doubles each failure.")
    retry_max: Duration = Field(30.0, gt=0, description="Longest wait between reconnection attempts.")
    unban_retention: Duration = Field(
        7 * 86400.0,
        gt=0,
        description="How long an unban is remembered (in Redis and on each node), so that a node cut off from "
        "Redis for less than this does not bring back a ban lifted meanwhile.",
    )

    @field_validator("redis")
    @classmethod
    def _check_redis(cls, v: str | None) -> str | None:
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

    @field_validator("node", "prefix")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c.isspace() or c in "\"{}" for c in v) or len(v) > 200):
            raise ValueError(f"{v!r}: a name without spaces, quotes or braces (at most 200 characters)")
        return v

    @model_validator(mode="after")
    def _check_share(self) -> ShareSettings:
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
        return self


class CrowdSecSettings(_Strict):
    """edgeward as a CrowdSec bouncer: decisions of the Local API (type ban, scopes Ip and Range)
    are enforced at admit like local bans. With machine credentials, this node's own bans are
    also sent to the LAPI as alerts. Names follow CrowdSec's bouncers (update_frequency,
    ca_cert_path, cert_path, key_path, insecure_skip_verify); read at start."""

    lapi_url: str = Field(
        ..., description="The Local API, e.g. \"http://127.0.0.1:8080/\" (a bouncer's api_url)."
    )
    api_key: str | None = Field(None, description="The bouncer's API key (`cscli bouncers add NAME`).")
    api_key_file: str | None = Field(
        None, description="A file holding the API key (instead of api_key; surrounding whitespace is ignored)."
    )
    update_frequency: Duration = Field(10.0, gt=0, description="How often the decision stream is polled.")
    max_backoff: Duration = Field(
        60.0, gt=0,
        description="While the LAPI fails, polls back off (update_frequency doubled per failure) up to this; "
        "the last known decisions stay enforced meanwhile.",
    )
    timeout: Duration = Field(
        5.0, gt=0,
        description="Longest LAPI request. The start of the edge waits for the first poll at most this long.",
    )
    origins: list[str] = Field(
        default_factory=list,
        description="Only decisions of these origins (e.g. [\"crowdsec\", \"cscli\", \"CAPI\", \"lists\"]); "
        "empty = all.",
    )
    scenarios_containing: list[str] = Field(
        default_factory=list, description="Only decisions whose scenario contains one of these words."
    )
    scenarios_not_containing: list[str] = Field(
        default_factory=list, description="No decision whose scenario contains one of these words."
    )
    ca_cert_path: str | None = Field(None, description="CA certificate (PEM) the LAPI's certificate must chain to.")
    cert_path: str | None = Field(
        None, description="Client certificate (PEM) for TLS authentication to the LAPI (with key_path)."
    )
    key_path: str | None = Field(None, description="Key of cert_path (PEM, unencrypted).")
    insecure_skip_verify: bool = Field(
        False, description="Accept any LAPI certificate (tests only: anyone on the path can feed decisions)."
    )
    machine_id: str | None = Field(
        None,
        description="A machine (watcher) login, e.g. from `cscli machines add NAME --password ...`: with it, this "
        "node's jail bans are sent to the LAPI as alerts.",
    )
    password: str | None = Field(None, description="The machine's password.")
    password_file: str | None = Field(None, description="A file holding the machine's password (instead of password).")
    alert_origin: str = Field(
        "crowdsec", min_length=1,
        description="Origin of the decisions sent with alerts. \"crowdsec\" (what a CrowdSec agent's own decisions "
        "carry) is listed by `cscli decisions list` and `cscli alerts list`; any other origin only with --all. The "
        "scenario is \"edgeward/<jail>\".",
    )

    @field_validator("lapi_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        u = urlsplit(v.strip())
        if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
            raise ValueError(f"lapi_url {v!r} is not an http:// or https:// URL like \"http://127.0.0.1:8080/\"")
        try:
            u.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"lapi_url {v!r} has an invalid port") from None
        return v.strip() if v.strip().endswith("/") else v.strip() + "/"

    @model_validator(mode="after")
    def _check_credentials(self) -> CrowdSecSettings:
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
        return self


class GuardSettings(_Strict):
    """Settings shared by all jails."""

    ignoreip: list[CIDR] = Field(default_factory=list, description="Addresses and networks no jail bans.")
    filter_dirs: list[str] = Field(
        default_factory=lambda: ["/etc/fail2ban/filter.d"],
        description="Where filters named without a path are searched, in order; /etc/fail2ban/filter.d and "
        "edgeward's own filters are searched after these.",
    )
    db_synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL",
        description="SQLite durability of the ban store (edge.state_dir/guard.sqlite): NORMAL survives kill -9, "
        "FULL also power loss (one more fsync per ban).",
    )
    match_isolation: Literal["process", "thread", "inline"] = Field(
        "process",
        description=(
            "Where jail filters run. \"process\": in a matcher process beside the edge, so a regex that "
            "backtracks catastrophically cannot freeze the data plane, and each batch of lines is bounded by "
            "match_timeout. \"thread\": on a thread of the edge (no extra process, but Python's re holds the "
            "interpreter while matching, so a runaway regex stalls the edge, unbounded). \"inline\": on the "
            "event loop itself (tests and benchmarks only: every match delays the data plane)."
        ),
    )
    match_timeout: Duration = Field(
        2.0,
        gt=0,
        description=(
            "Deadline of one batch of log lines in the matcher process (match_isolation = \"process\"). Past it "
            "the process is killed and restarted, the batch dropped and counted in the jail's filter_timeouts."
        ),
    )
    poll_interval: Duration = Field(
        0.25, gt=0, description="Log polling period where inotify is missing (and while a log's directory is missing)."
    )
    use_inotify: bool = Field(True, description="Wake on inotify events; false polls every poll_interval.")
    max_tracked: int = Field(
        100000, ge=1,
        description="Addresses counted per jail before the least recently seen is forgotten (bounds memory "
        "under a flood of spoofed sources).",
    )
    history_max_age: Duration = Field(
        7 * 86400.0, gt=0, description="How long past bans count for growing bans (older history is purged)."
    )
    nft: NftSettings = Field(default_factory=lambda: NftSettings.model_validate({}), description="nftables mirror of bans.")
    share: ShareSettings = Field(
        default_factory=lambda: ShareSettings.model_validate({}), description="Bans shared between edge nodes (Redis)."
    )
    crowdsec: CrowdSecSettings | None = Field(
        None, description="Enforce a CrowdSec Local API's decisions (unset: not a bouncer)."
    )


class CertificateFiles(_Strict):
    """A certificate chain and its key, from PEM files."""

    cert: str = Field(..., description="PEM chain: the certificate first, then its intermediates.")
    key: str = Field(..., description="PEM private key (RSA >= 2048 bits or ECDSA), unencrypted; mode 0600 or 0640.")


class TlsSettings(_Strict):
    """TLS termination: certificates from files (ACME certificates are added by name)."""

    certificates: list[CertificateFiles] = Field(
        default_factory=list,
        description="Certificates from files, chosen by SNI against their subjectAltName DNS names "
        "(exact names before \"*.example.org\" wildcards, which cover one label).",
    )
    default_certificate: str | None = Field(
        None,
        description="A name whose certificate (from a file or ACME) is served to clients whose SNI no "
        "certificate covers, or who send none; unset = such handshakes are refused (unrecognized_name alert).",
    )
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="Oldest TLS version accepted.")

    @field_validator("default_certificate")
    @classmethod
    def _check_default(cls, v: str | None) -> str | None:
        if v is None:
            return v
        n = v.strip().lower().rstrip(".")
        if not n or " " in n or "*" in n:
            raise ValueError(f"{v!r} is not a name (write the DNS name whose certificate is the default)")
        return n


class AcmeSettings(_Strict):
    """Certificates from an ACME CA (Let's Encrypt by default) for the names the edge terminates."""

    enabled: bool = Field(
        True,
        description="Get certificates from the ACME CA for every name of an HTTP service that no [tls] certificate "
        "covers (names that cannot have a public certificate, such as IP addresses and wildcards, are "
        "listed as unsupported in `edgeward status`); false = file certificates only.",
    )
    email: str | None = Field(None, description="Contact address of the ACME account (expiry notices); optional.")
    directory: str = Field(
        "https://acme-v02.api.letsencrypt.org/directory",
        description="ACME directory URL. Let's Encrypt staging: https://acme-staging-v02.api.letsencrypt.org/directory.",
    )
    ca_file: str | None = Field(
        None, description="PEM CA bundle trusted for the directory's HTTPS (a private CA, or pebble in tests); "
        "unset = the system's.",
    )
    challenges: list[AcmeChallenge] = Field(
        default_factory=lambda: list[AcmeChallenge](["http-01", "tls-alpn-01"]), min_length=1,
        description="Challenge types, in order of preference; after a failed attempt the next one is tried. "
        "http-01 needs port 80 reaching the edge, tls-alpn-01 port 443.",
    )
    key_type: Literal["ecdsa-p256", "ecdsa-p384", "rsa2048", "rsa4096"] = Field(
        "ecdsa-p256", description="Key of each certificate (a new key at every renewal).",
    )
    renew_before: Duration | None = Field(
        None, gt=0, description="Renew this long before expiry; unset = when renew_fraction of the lifetime remains.",
    )
    renew_fraction: float = Field(
        1 / 3, gt=0, lt=1, description="Renew when this fraction of a certificate's lifetime remains (1/3: day 60 of 90).",
    )
    retry_min: Duration = Field(60.0, gt=0, description="Wait after a first failed attempt; doubles with each failure.")
    retry_max: Duration = Field(86400.0, gt=0, description="Longest wait between attempts for a failing name.")
    order_timeout: Duration = Field(120.0, gt=0, description="Longest an order may take from creation to certificate.")
    concurrency: int = Field(2, ge=1, le=16, description="Orders in flight at once (each on a worker thread).")

    @field_validator("directory")
    @classmethod
    def _check_directory(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError(f"{v!r}: an ACME directory is an https:// URL (RFC 8555 6.1)")
        return v

    @model_validator(mode="after")
    def _check_retry(self) -> AcmeSettings:
        if self.retry_min > self.retry_max:
            raise ValueError("retry_min is longer than retry_max")
        return self


class KernelSettings(_Strict):
    """The nftables table of services with forward = "kernel" (DNAT, and masquerade where asked)."""

    table: str = Field("edgeward_fwd", description="Table name (family inet); edgeward owns it and touches no other.")
    command: list[str] = Field(
        default_factory=lambda: ["nft"], min_length=1,
        description="How to run nft, e.g. [\"ip\", \"netns\", \"exec\", \"ns1\", \"nft\"].",
    )
    timeout: Duration = Field(10.0, gt=0, description="Longest run of one nft command.")

    @field_validator("table")
    @classmethod
    def _check_table(cls, v: str) -> str:
        return nft_table_name(v)


class Config(_Strict):
    """The whole file."""

    edge: EdgeSettings = Field(default_factory=EdgeSettings)  # type: ignore[arg-type]
    listeners: dict[str, ListenerSettings] = Field(default_factory=dict)
    pools: dict[str, PoolSettings] = Field(default_factory=dict)
    handoffs: dict[str, HandoffSettings] = Field(
        default_factory=dict, description="Handoff endpoints: local servers that receive client sockets.",
    )
    services: dict[str, ServiceSettings] = Field(default_factory=dict)
    guard: GuardSettings = Field(default_factory=lambda: GuardSettings.model_validate({}), description="Shared jail settings.")
    jails: dict[str, JailSettings] = Field(default_factory=dict, description="Jails that ban at the edge.")
    tls: TlsSettings = Field(default_factory=lambda: TlsSettings.model_validate({}), description="TLS termination.")
    acme: AcmeSettings = Field(default_factory=lambda: AcmeSettings.model_validate({}), description="ACME certificates.")
    http: HttpSettings = Field(default_factory=lambda: HttpSettings.model_validate({}), description="The HTTP reverse proxy.")
    kernel: KernelSettings = Field(
        default_factory=lambda: KernelSettings.model_validate({}), description="Kernel forwarding (nftables DNAT).")


def json_schema() -> dict[str, object]:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "edgeward configuration"
    return schema
