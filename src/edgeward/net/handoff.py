"""The handoff action: give the client's socket itself to a local server (SCM_RIGHTS).

A route whose service goes to a `[handoffs.NAME]` endpoint ends here once sniffed. The
client's first bytes are still unread in its socket (sniffing peeks), so the local server
reads the ClientHello or request as if it had accepted the connection itself. For each
connection the edge connects to the endpoint's Unix socket, sends one record
(codec/handoff.py: service, sniffed name and ALPN, the client's address, the listener's)
with the client socket attached, and waits for the one-byte acknowledgement; on ACCEPTED
it closes its own copy and is out of the data path.

Anything else (nobody listening, backlog full, the endpoint's in-flight bound reached, a
refusal, no answer within ack_timeout, the endpoint closing first) leaves the client with
the edge, untouched: it is relayed to the service's `fallback`, or refused with
`handoff_unavailable`; each outcome is counted in `handoffs{endpoint,result}`.

No descriptor is ever half-served: when the wait times out, the edge shuts the control
connection down before reading it one last time. An acknowledgement queued before that
shutdown is still read (the handoff happened); one sent after it fails with EPIPE at the
receiver, which then drops its copy (edgeward.handoff does), so exactly one side serves the
client.
"""

from __future__ import annotations

import array
import asyncio
import errno
import itertools
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..codec import NEED_MORE
from ..codec.handoff import Ack, HandoffError, HandoffRecord, build_record, parse_ack
from ..events import ConnClosed, ConnOpened
from . import sockets
from .forward import CLOSED, Forward

if TYPE_CHECKING:
    from ..config.schema import HandoffSettings
    from ..upstream.pool import Pool
    from .tcp import TcpConn

log = logging.getLogger("edgeward.handoff")

_ids = itertools.count(1)
# Results counted in handoffs{endpoint,result}; all but "accepted" send the client to the fallback.
RESULTS = ("accepted", "down", "busy", "refused", "timeout", "closed", "error")


class Endpoint:
    """A handoff endpoint's live state (kept across reloads by `Endpoints`)."""

    __slots__ = ("ack_timeout", "in_flight", "max_in_flight", "name", "path")

    def __init__(self, name: str, settings: HandoffSettings) -> None:
        self.name = name
        self.in_flight = 0
        self.configure(settings)

    def configure(self, settings: HandoffSettings) -> None:
        self.path = settings.socket
        self.ack_timeout = settings.ack_timeout
        self.max_in_flight = settings.max_in_flight


class Endpoints:
    """The endpoints of the process by name: a reload keeps the in-flight count of each."""

    def __init__(self) -> None:
        self.by_name: dict[str, Endpoint] = {}

    def get(self, name: str, settings: HandoffSettings) -> Endpoint:
        ep = self.by_name.get(name)
        if ep is None:
            ep = self.by_name[name] = Endpoint(name, settings)
        else:
            ep.configure(settings)
        return ep


@dataclass(frozen=True, slots=True)
class HandOff:
    """Hand the client socket to `endpoint`; on failure relay with `fallback`, or refuse."""

    endpoint: Endpoint
    fallback: Forward | None
    kind: str = "handoff"
    # The record tells the server what was sniffed (TLS or not, SNI, ALPN), so always sniff.
    needs_sniff: bool = True

    @property
    def pool(self) -> Pool | None:
        return self.fallback.pool if self.fallback is not None else None

    def start(self, conn: TcpConn) -> None:
        ep = self.endpoint
        counters = conn.plane.counters
        if ep.in_flight >= ep.max_in_flight:
            counters.inc("handoffs", ep.name, "busy")
            self.give_up(conn)
            return
        try:
            record = build_record(_record_of(conn))
        except HandoffError as e:  # cannot happen for sniffed values; counted, never fatal
            log.warning("handoff to %s: cannot build the record: %s", ep.name, e)
            counters.inc("handoffs", ep.name, "error")
            self.give_up(conn)
            return
        _Pending(self, conn).start(record)

    def give_up(self, conn: TcpConn) -> None:
        """The endpoint did not take `conn`: the fallback, or a refusal."""
        if conn.state == CLOSED:
            return
        if self.fallback is not None:
            self.fallback.start(conn)
        else:
            conn.fail("handoff_unavailable")


def _record_of(conn: TcpConn) -> HandoffRecord:
    local = conn.local
    if local is None:
        try:
            la = conn.client.getsockname()
            local = conn.local = (la[0], la[1])
        except OSError:
            local = None
    sn = conn.sniffed
    route = conn.route
    assert route is not None
    return HandoffRecord(
        service=route.service,
        client=(conn.peer.ip, conn.peer.port),
        listener=local,
        protocol=sn.protocol if sn is not None else None,
        name=sn.name if sn is not None and sn.name else None,
        alpn=sn.alpn if sn is not None else (),
        listener_name=conn.listener.name,
        via_proxy=conn.peer.via_proxy,
        handoff_id=next(_ids),
    )


class _Pending:
    """One handoff between sending the socket and the acknowledgement."""

    __slots__ = ("action", "conn", "ctl", "timer")

    def __init__(self, action: HandOff, conn: TcpConn) -> None:
        self.action = action
        self.conn = conn
        self.ctl: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None

    def start(self, record: bytes) -> None:
        ep = self.action.endpoint
        try:
            ctl = sockets.handoff_control()
        except OSError as e:
            log.warning("handoff to %s: no socket: %s", ep.name, e)
            self._failed("error")
            return
        ep.in_flight += 1
        self.ctl = ctl
        # A Unix stream connect completes (or fails) at once: there is no handshake to wait for.
        err = ctl.connect_ex(sockets.unix_address(ep.path))
        if err:
            self._failed("busy" if err in (errno.EAGAIN, errno.EWOULDBLOCK) else "down")
            return
        fds = array.array("i", [self.conn.client.fileno()])
        self.conn.shared = True  # the endpoint may keep the socket's file open after the edge closes it
        try:
            sent = ctl.sendmsg([record], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], socket.MSG_NOSIGNAL)
        except OSError as e:
            # Connected, then closed by the endpoint before the record went out: the same outcome
            # as a close after it (read as EOF below), whichever came first.
            self._failed("closed" if e.errno in (errno.EPIPE, errno.ECONNRESET) else "error")
            return
        if sent != len(record):  # a fresh connection's buffer always takes a 4 KiB record whole
            self._failed("error")
            return
        loop = self.conn.plane.loop
        loop.add_reader(ctl.fileno(), self._on_answer)
        self.timer = loop.call_later(ep.ack_timeout, self._on_timeout)

    def _on_answer(self) -> None:
        ctl = self.ctl
        assert ctl is not None
        try:
            data = ctl.recv(16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._decide(data, "closed")

    def _on_timeout(self) -> None:
        self.timer = None
        ctl = self.ctl
        assert ctl is not None
        # Shut down first, then read: an acknowledgement is either already queued (read below) or
        # fails at the receiver with EPIPE (which then drops its copy). Never both sides serving.
        try:
            ctl.shutdown(socket.SHUT_RDWR)
            data = ctl.recv(16)
        except OSError:
            data = b""
        self._decide(data, "timeout")

    def _decide(self, data: bytes, otherwise: str) -> None:
        ack = parse_ack(data)
        if ack is NEED_MORE:
            self._failed(otherwise)
        elif ack is Ack.ACCEPTED:
            self._accepted()
        else:
            log.debug("handoff to %s refused: %s", self.action.endpoint.name, ack)
            self._failed("refused")

    def _end(self) -> None:
        """Close the control connection (if it was made) and leave the endpoint's in-flight count."""
        ctl = self.ctl
        if ctl is None:
            return
        self.ctl = None
        self.action.endpoint.in_flight -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        loop = self.conn.plane.loop
        loop.remove_reader(ctl.fileno())
        ctl.close()

    def _failed(self, result: str) -> None:
        self._end()
        conn = self.conn
        ep = self.action.endpoint
        conn.plane.counters.inc("handoffs", ep.name, result)
        log.debug("handoff to %s: %s", ep.name, result)
        self.action.give_up(conn)

    def _accepted(self) -> None:
        self._end()
        conn = self.conn
        ep = self.action.endpoint
        plane = conn.plane
        plane.counters.inc("handoffs", ep.name, "accepted")
        if conn.state == CLOSED:
            # Closed under us (a ban, a stop) while the server was taking it: the server has it now.
            return
        route = conn.route
        assert route is not None
        upstream = "handoff:" + ep.name
        listener = conn.listener.name
        peer = conn.peer
        plane.bus.publish(ConnOpened(listener, peer, route.service, upstream))
        conn.detach().close()  # the server holds the connection; the edge lets go of its copy
        plane.bus.publish(ConnClosed(listener, peer, route.service, upstream, 0, 0,
                                     plane.loop.time() - conn.t0, "handed_off"))

