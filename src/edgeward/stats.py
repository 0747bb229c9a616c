"""The edge's counters: plain integers, incremented on the hot path, read at scrape time.

`Counters` holds one dict per counter family, keyed by its labels, so that the
admin API and the Prometheus collector know every family's label names
(no decoding of string tuples by position). `Stats` subscribes to the event
bus for what events say (refusals, closes, protocol errors, per-service
traffic); per-datagram and per-accept counts that have no event are
incremented directly by the data plane, and so are HTTP requests per service
(`Stats.services`, counted by the HTTP proxy: one request is too little work
to build an event for when nobody else wants it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from .events import (
    ConnClosed,
    ConnOpened,
    ConnRefused,
    EventBus,
    ProtocolError,
    UdpSessionEnded,
    UdpSessionStarted,
)

# family → (label names, help); the order of families is the order of `status` and `/metrics`.
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "refused": (("listener", "reason"), "Connections (UDP: sessions) refused, by listener and reason."),
    "closed": (("listener", "reason"), "Relayed connections and UDP sessions closed, by listener and reason."),
    "protocol_errors": (("listener", "kind"), "Clients that sent malformed or forged input, by kind."),
    "connect_failures": (("pool", "server"), "Failed connections to upstream servers."),
    "handoffs": (("endpoint", "result"), "Connections offered to handoff endpoints, by result (accepted, or why "
                 "the client went to the fallback: down, busy, refused, timeout, closed, error)."),
    "udp_dropped": (("listener", "reason"), "UDP datagrams dropped, by reason."),
    "accept_errors": (("listener", "error"), "accept() failures (out of descriptors or memory)."),
    "reloads": (("result",), "Config reloads applied or rejected."),
}


class Counters:
    """Counter families; `inc(family, *labels)` is a dict increment."""

    __slots__ = ("families",)

    def __init__(self) -> None:
        self.families: dict[str, defaultdict[tuple[str, ...], int]] = {f: defaultdict(int) for f in FAMILIES}

    def inc(self, family: str, *labels: str) -> None:
        self.families[family][labels] += 1

    def get(self, family: str, *labels: str) -> int:
        return self.families[family].get(labels, 0)

    def rows(self) -> Iterator[tuple[str, tuple[str, ...], int]]:
        """(family, labels, value), sorted within each family."""
        for family, values in self.families.items():
            for labels, v in sorted(values.items()):
                yield family, labels, v


@dataclass(slots=True)
class ServiceStats:
    active: int = 0
    total: int = 0
    bytes_in: int = 0  # client → upstream, of ended connections/sessions (live ones are added at read)
    bytes_out: int = 0  # upstream → client
    udp_active: int = 0
    udp_total: int = 0
    dgrams_in: int = 0
    dgrams_out: int = 0
    requests: int = 0  # HTTP requests (their bytes are in bytes_in/bytes_out)


class Stats:
    """Counters and per-service figures, kept from the event bus."""

    def __init__(self, bus: EventBus, counters: Counters) -> None:
        self.counters = counters
        self.services: defaultdict[str, ServiceStats] = defaultdict(ServiceStats)
        fam = counters.families
        refused, closed, errors = fam["refused"], fam["closed"], fam["protocol_errors"]
        services = self.services

        def on_refused(ev: ConnRefused) -> None:
            refused[(ev.listener, ev.reason)] += 1

        def on_error(ev: ProtocolError) -> None:
            errors[(ev.listener, ev.kind)] += 1

        def on_opened(ev: ConnOpened) -> None:
            st = services[ev.service]
            st.active += 1
            st.total += 1

        def on_closed(ev: ConnClosed) -> None:
            if not ev.upstream:  # never routed: counted as a refusal already
                return
            closed[(ev.listener, ev.reason)] += 1
            st = services[ev.service]
            st.active -= 1
            st.bytes_in += ev.bytes_in
            st.bytes_out += ev.bytes_out

        def on_udp_started(ev: UdpSessionStarted) -> None:
            st = services[ev.service]
            st.udp_active += 1
            st.udp_total += 1

        def on_udp_ended(ev: UdpSessionEnded) -> None:
            closed[(ev.listener, ev.reason)] += 1
            st = services[ev.service]
            st.udp_active -= 1
            st.bytes_in += ev.bytes_in
            st.bytes_out += ev.bytes_out
            st.dgrams_in += ev.datagrams_in
            st.dgrams_out += ev.datagrams_out

        bus.subscribe(ConnRefused, on_refused)
        bus.subscribe(ProtocolError, on_error)
        bus.subscribe(ConnOpened, on_opened)
        bus.subscribe(ConnClosed, on_closed)
        bus.subscribe(UdpSessionStarted, on_udp_started)
        bus.subscribe(UdpSessionEnded, on_udp_ended)
