"""The record of one HTTP request, given to `on_request` (access log, guard, dashboard)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HttpRequestLog:
    started: float  # wall clock (time.time()) at the request's first byte
    client: str  # the real client address (from a trusted PROXY header when there was one)
    client_port: int
    via_proxy: bool  # `client` came from a trusted PROXY header
    local: str  # "address:port" the client connected to
    scheme: str  # "http" | "https"
    service: str | None  # the service that took the request; None when the edge answered itself
    host: str | None  # normalized Host
    method: str
    path: str  # the target's path (no query), as received
    query: str  # the target's query, "" when none
    status: int  # sent to the client; 499 = the client left before a response
    bytes_in: int  # from the client: head and body
    bytes_out: int  # to the client: head and body (for an upgraded connection: everything relayed)
    duration: float  # seconds, first byte of the request to the end of its response (or tunnel)
    upstream: str | None  # the server that answered ("https://10.0.0.5:443")
    upgraded: bool  # switched protocols (WebSocket); logged when the tunnel ends
    error: str | None  # why the edge answered itself or cut the exchange short, e.g. "timeout:header"
    listener: str = ""  # the edge's name of the listener (default: `local`)
