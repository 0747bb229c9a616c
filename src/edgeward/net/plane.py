"""What every listener, connection and session of this process shares: the data plane's context.

Listeners and connections hold a `DataPlane`, never the `Edge` that owns it, so
the network layer depends only on things below it (events, admission,
counters, pools) and the edge's lifecycle code can change without touching it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from ..admission import Admission
from ..events import EventBus, Peer, ProtocolError
from ..routing import Route
from ..runtime import ListenerRuntime
from ..stats import Counters
from ..upstream.pool import Server
from .flow import Flow
from .pipes import HAS_SPLICE, PipePool
from .poller import Deadlines, Poller

# The step of the coarse clock below (seconds): the edge's sweeper refreshes it and judges idle
# connections and UDP sessions once per step. An activity stamp is the clock's value when the
# activity happened, so it lags the real time by up to the step that followed it: idleness is
# judged with that step added, so nothing is closed before its timeout (but up to about two
# steps after it). The sweeper adds the last step it measured, which covers a busy loop's late
# step for recent stamps; an older stamp whose step ran late could still be judged early by that
# lateness (milliseconds, against timeouts of seconds).
CLOCK_STEP = 1.0


class LiveConn(Protocol):
    """A TCP connection (net/tcp.py's TcpConn) as the edge's sweeper and `status` see it."""

    last: float  # the coarse clock at its last activity
    rt: ListenerRuntime
    route: Route | None
    server: Server | None
    flows: tuple[Flow, Flow] | None  # set while relaying

    def close(self, reason: str = ...) -> None: ...
    def fail(self, reason: str) -> None: ...


class DataPlane:
    __slots__ = ("admission", "bus", "clock", "conns", "counters", "deadlines", "loop", "now", "pipes", "poller",
                 "splice")

    def __init__(self, loop: asyncio.AbstractEventLoop, admission: Admission, bus: EventBus, counters: Counters,
                 splice: bool) -> None:
        self.loop = loop
        self.admission = admission
        self.bus = bus
        self.counters = counters
        self.splice = HAS_SPLICE and splice
        self.pipes = PipePool()
        self.poller = Poller(loop)  # connection sockets; listeners stay on the loop's own readers
        self.deadlines = Deadlines(loop)  # connect timeouts
        self.conns: set[LiveConn] = set()
        # A coarse clock, refreshed once a second by the edge's sweeper: connections stamp their
        # activity with it, which costs nothing per relayed chunk.
        self.now = time.monotonic()
        self.clock: Callable[[], float] = time.monotonic

    def protocol_error(self, listener: str, peer: Peer, kind: str) -> None:
        """An edge-observed failure of this client (garbage, a forged PROXY header, ...)."""
        self.bus.publish(ProtocolError(listener, peer, kind))

    def close(self) -> None:
        """After every connection closed: the pooled pipes and the epoll."""
        self.pipes.close()
        self.poller.shutdown()
