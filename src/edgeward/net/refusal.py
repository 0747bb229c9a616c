"""What a refused client sees, by refusal reason: a deliberate choice, not an accident of close().

- **Reset** (RST, via SO_LINGER 0): bans, limits, protocol errors (forged or invalid
  PROXY headers, malformed or stalled or half-closed hellos). The edge spends nothing
  on these clients: no goodbye, no TIME_WAIT entry, nothing that tells a scanner more.
- **Answered, then closed cleanly** (FIN): a client that spoke a known protocol correctly
  but cannot be served. No route for its name: a TLS client gets the
  `unrecognized_name` alert, an HTTP client `421 Misdirected Request`. No upstream
  answers: TLS `internal_error`, HTTP `503 Service Unavailable`. Others get a plain FIN.
  The peeked bytes are read first, so that closing sends FIN rather than RST.
"""

from __future__ import annotations

import socket
import struct
from _socket import socket as RawSocket

from ..codec.answers import INTERNAL_ERROR, UNRECOGNIZED_NAME, http_response, tls_alert

RESET = frozenset({
    "banned", "global_limit", "listener_limit", "client_limit",
    "proxy_untrusted", "proxy_invalid", "sniff_timeout", "sniff_half_closed", "sniff_stalled",
    "client_error", "closed_during_sniff",
})
_NO_ROUTE = {"tls": tls_alert(UNRECOGNIZED_NAME),
             "http": http_response(421, "Misdirected Request", "No service for this name here.\n")}
_NO_UPSTREAM = {"tls": tls_alert(INTERNAL_ERROR),
                "http": http_response(503, "Service Unavailable", "The service is unavailable. Try again later.\n")}
ANSWERS: dict[str, dict[str, bytes]] = {
    "no_route": _NO_ROUTE,
    "no_server": _NO_UPSTREAM, "upstream_unreachable": _NO_UPSTREAM,
    "upstream_socket": _NO_UPSTREAM, "upstream_error": _NO_UPSTREAM,
    "handoff_unavailable": _NO_UPSTREAM, "transparent_family": _NO_UPSTREAM,
}
LINGER_RESET = struct.pack("ii", 1, 0)


def reset(sock: RawSocket) -> None:
    """Close with an RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass
    sock.close()


def answer(sock: RawSocket, reason: str, protocol: str | None, drain: int) -> None:
    """Read what the client sent (at most `drain` bytes: what was peeked), say the refusal in its
    protocol if it has a message for `reason`, and leave the socket to be closed with a FIN."""
    try:
        while drain > 0:
            got = sock.recv(min(drain, 65536))
            if not got:
                break
            drain -= len(got)
    except OSError:
        pass
    msg = ANSWERS.get(reason, {}).get(protocol or "")
    if msg:
        try:
            sock.send(msg)
        except OSError:
            pass
