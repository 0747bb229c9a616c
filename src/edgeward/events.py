"""Typed events of the edge and the bus that carries them to subscribers.

Every step of a connection's path says what happened as one small immutable
event; whoever cares subscribes to its type: the counters behind `status` and
`/metrics`, the access log, the guard (edge-observed failures are jail
sources), and later the dashboard. Publishers never know who listens.

The bus is on the hot path (two events per connection), so events are
NamedTuples (built by one C call, unlike frozen dataclasses) and the bus is a
dict of tuples of plain functions: `publish` looks up the event's type once and
calls each subscriber; an event type nobody subscribed to costs one lookup.
Subscribers run on the event loop and must not block (the access log queues
lines for a writer thread; the guard queues failures for its jails).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar


class Peer(NamedTuple):
    """The client as every step after accept sees it, built once (admission.peer_from_sockaddr).

    `ip` is normalised text: IPv4-mapped IPv6 reduced to IPv4, the IPv6 zone id dropped, so that
    bans, limits, distinct-client counts and logs agree whatever socket family accepted it.
    `via_proxy` is True when the address came from a trusted PROXY header rather than the socket.
    """

    ip: str
    port: int
    via_proxy: bool = False

    @property
    def family(self) -> int:
        return 6 if ":" in self.ip else 4

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


# ---------------------------------------------------------------------- TCP connections
class ConnAccepted(NamedTuple):
    """A connection passed admission (published only when someone subscribed: a flood jail)."""

    listener: str
    peer: Peer


class ConnRefused(NamedTuple):
    """A connection closed before it was relayed: at admit (ban, limit) or while sniffing,
    routing or connecting upstream. `reason` is the counter label (e.g. "banned", "no_route")."""

    listener: str
    peer: Peer
    reason: str


class ConnOpened(NamedTuple):
    """A connection was routed and its action took it (relaying to `upstream`, handed over...)."""

    listener: str
    peer: Peer
    service: str
    upstream: str


class ConnClosed(NamedTuple):
    """Every admitted connection ends with exactly one of these, refused or not.

    `bytes_in` is client → upstream, `bytes_out` upstream → client; `service`/`upstream` are
    empty when it never got that far; `duration` is seconds since accept. `protocol`, `name`
    (SNI, HTTP Host, XMPP to) and `alpn` (the protocols the client offered, comma-separated) are
    what sniffing found, empty when the listener did not sniff."""

    listener: str
    peer: Peer
    service: str
    upstream: str
    bytes_in: int
    bytes_out: int
    duration: float
    reason: str
    protocol: str = ""
    name: str = ""
    alpn: str = ""


class ProtocolError(NamedTuple):
    """The edge saw a client misbehave: a malformed hello, a forged or invalid PROXY header,
    a sniff timeout. `kind` says which ("bad_tls", "proxy_untrusted", "sniff_timeout", ...)."""

    listener: str
    peer: Peer
    kind: str


class HttpRequest(NamedTuple):
    """One HTTP request the edge proxied or answered itself (connections handed to the HTTP layer
    are logged per request, not by ConnClosed)."""

    listener: str
    peer: Peer
    service: str  # "" when the edge answered itself (redirect, ACME challenge, error page)
    scheme: str  # http | https
    host: str
    method: str
    path: str
    query: str
    status: int  # 499: the client left before a response
    bytes_in: int
    bytes_out: int
    duration: float
    upstream: str  # "" when no upstream answered
    upgraded: bool  # switched protocols (WebSocket): logged when the tunnel ends
    error: str  # why the edge answered itself or cut the exchange short; "" when nothing went wrong


# ---------------------------------------------------------------------- UDP sessions
class UdpSessionStarted(NamedTuple):
    listener: str
    peer: Peer
    service: str
    upstream: str


class UdpSessionEnded(NamedTuple):
    listener: str
    peer: Peer
    service: str
    upstream: str
    bytes_in: int
    bytes_out: int
    datagrams_in: int
    datagrams_out: int
    duration: float
    reason: str


# ---------------------------------------------------------------------- control plane
class HealthChanged(NamedTuple):
    pool: str
    server: str
    healthy: bool


class BanAdded(NamedTuple):
    """An address became banned (on `listeners`; None: on all)."""

    address: str
    listeners: frozenset[str] | None


class BanLifted(NamedTuple):
    address: str


Event = (ConnAccepted | ConnRefused | ConnOpened | ConnClosed | ProtocolError | HttpRequest | UdpSessionStarted | UdpSessionEnded
         | HealthChanged | BanAdded | BanLifted)
E = TypeVar("E")


class EventBus:
    """Subscribers per event type; `publish` calls them in subscription order."""

    __slots__ = ("_subs", "kinds")

    def __init__(self) -> None:
        self._subs: dict[type, tuple[Callable[[object], None], ...]] = {}
        # The event types someone listens to: `Kind in bus.kinds` lets a hot path skip building
        # an event nobody reads, for the price of one set lookup.
        self.kinds: set[type] = set()

    def subscribe(self, kind: type[E], fn: Callable[[E], None]) -> Callable[[], None]:
        """Call `fn` with every event of type `kind`; returns the function that unsubscribes."""
        self._subs[kind] = (*self._subs.get(kind, ()), fn)  # type: ignore[arg-type]
        self.kinds.add(kind)

        def unsubscribe() -> None:
            self._subs[kind] = rest = tuple(f for f in self._subs.get(kind, ()) if f is not fn)
            if not rest:
                self.kinds.discard(kind)
        return unsubscribe

    def wants(self, kind: type) -> bool:
        """True if someone listens: lets a publisher skip building an event nobody reads."""
        return kind in self.kinds

    def publish(self, event: object) -> None:
        for fn in self._subs.get(type(event), ()):
            fn(event)
