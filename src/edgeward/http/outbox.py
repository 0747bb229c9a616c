"""Writes sent at the end of the event-loop turn that made them.

Everything the HTTP layer writes to a client or an upstream connection is queued on that
connection (`Sender.write`) and sent when the loop has run every callback of the current turn
(`Outbox.flush`, scheduled with call_soon on the first write of the turn). Two reasons:

- One send per connection per turn: a response head and its body, or several pipelined
  responses, go out joined (`write_parts`), as one TCP segment or one TLS record.
- Fewer context switches. Writing a request to an upstream on the same machine wakes it, and the
  scheduler often runs it at once, in the middle of the edge's batch of ready sockets: the edge
  was preempted about 0.9 times per request. Sent together at the end of the batch, the upstream
  gets them in one wake-up (0.6 times per request; HAProxy 0.5), and the edge spends 10-15%
  less CPU per request (wrk keep-alive through the edge to nginx; docs/architecture.md).

Order per connection is kept (one list per connection); a connection that closes sends what it
queued first (`send_out`), one that aborts drops it. Compiled with the rest of the HTTP layer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

JOIN_LIMIT = 16 * 1024  # pieces up to this size together are copied into one write


def write_parts(transport: asyncio.Transport, parts: Sequence[bytes]) -> None:
    """Write `parts` with one call: small ones (a head, a chunk's framing, a small body) joined,
    so a socket gets one send and a TLS connection one record; large ones as they are (no copy)."""
    if len(parts) == 1:
        transport.write(parts[0])
    elif sum(map(len, parts)) <= JOIN_LIMIT:
        transport.write(b"".join(parts))
    else:
        transport.writelines(parts)


class Outbox:
    """The connections with queued writes in this turn of one event loop."""

    __slots__ = ("loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop  # the running loop, taken at the first write when not given
        self.pending: list[Sender] = []

    def add(self, sender: Sender) -> None:
        if not self.pending:
            loop = self.loop
            if loop is None:
                loop = self.loop = asyncio.get_running_loop()
            loop.call_soon(self.flush)
        self.pending.append(sender)

    def flush(self) -> None:
        pending = self.pending
        self.pending = []
        for sender in pending:
            sender.send_out()


class Sender:
    """What a client and an upstream connection share for writing: a transport, whether the
    connection is closed, and the bytes queued for the end of the turn."""

    __slots__ = ("closed", "out", "outbox", "transport")

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.out: list[bytes] | None = None  # None while nothing is queued (no list per idle connection)

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            return
        out = self.out
        if out is None:
            self.out = [data]
            self.outbox.add(self)
        else:
            out.append(data)

    def write_parts(self, parts: Sequence[bytes]) -> None:
        if self.closed or self.transport is None:
            return
        out = self.out
        if out is None:
            self.out = list(parts)
            self.outbox.add(self)
        else:
            out.extend(parts)

    def send_out(self) -> None:
        """Send what is queued now (the outbox at the end of the turn; before a close or an EOF)."""
        out = self.out
        if out is not None:
            self.out = None
            t = self.transport
            if not self.closed and t is not None:
                write_parts(t, out)
