"""The master ↔ worker channel: one end of a SOCK_SEQPACKET socketpair, on the event loop."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("edgeward.workers")

MAX_FDS = 200  # per message (the kernel takes at most 253)
_CHUNK = 60_000  # bytes of JSON per packet; longer messages go in several
# Bytes a channel queues for a peer that does not read (a busy or stopped master) before it drops
# what can be dropped: "report" messages (what the jails hear), never bans, sockets or control.
MAX_QUEUED = 8 << 20
_ENTRY = 160  # what a queued packet costs besides its bytes (bytes header, tuple, list, deque slot)
DROPPABLE = frozenset({"report"})


class Channel:
    """One end of the master ↔ worker socketpair, on the event loop.

    Each packet is one byte (b"+": more of this message follows, b".": last) and JSON; file
    descriptors ride on a message's first packet. Sends never block: what the socket does not
    take is queued and written when it is writable again."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[list[Any], list[socket.socket]], None], on_closed: Callable[[], None],
                 max_queued: int = MAX_QUEUED) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.on_message = on_message
        self.on_closed = on_closed
        self.closed = False
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self._parts: list[bytes] = []
        self._fds: list[socket.socket] = []
        self._writing = False
        self.max_queued = max_queued
        self.queued = 0  # bytes held by _out (the packets, and what each entry costs)
        self.dropped = 0  # "report" messages dropped because the queue was over max_queued

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def send(self, msg: list[Any], fds: list[int] | None = None) -> None:
        if self.closed:
            return
        data = json.dumps(msg, separators=(",", ":")).encode()
        if self._out and self.queued + len(data) > self.max_queued and msg[0] in DROPPABLE:
            if self.dropped == 0:
                log.warning("workers: the other end of the control channel is not reading; dropping reports")
            self.dropped += 1
            return
        chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""]
        # Our own copies of the descriptors: the caller may close its socket before the queue
        # drains, and the kernel would give its number to the next socket opened (the wrong one
        # would be sent). Closed once sent, or with the channel.
        own = [os.dup(fd) for fd in fds] if fds else []
        for i, chunk in enumerate(chunks):
            packet = (b"." if i == len(chunks) - 1 else b"+") + chunk
            self._out.append((packet, own if i == 0 else []))
            self.queued += len(packet) + _ENTRY
        self._flush()

    def _flush(self) -> None:
        while self._out:
            packet, fds = self._out[0]
            try:
                if fds:
                    self.sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    self.sock.send(packet)
            except BlockingIOError:
                if not self._writing:
                    self._writing = True
                    self.loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError:
                self._lost()
                return
            self._out.popleft()
            self.queued -= len(packet) + _ENTRY
            for fd in fds:
                os.close(fd)
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        for _ in range(256):
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(_CHUNK + 16, socket.CMSG_SPACE(MAX_FDS * 4))
            except BlockingIOError:
                return
            except OSError:
                self._lost()
                return
            if not data:
                self._lost()
                return
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
                    self._fds.extend(socket.socket(fileno=fd) for fd in fds)
            self._parts.append(data[1:])
            if data[:1] == b"+":
                continue
            raw_msg = b"".join(self._parts)
            got, self._parts, self._fds = self._fds, [], []
            try:
                msg = json.loads(raw_msg)
                self.on_message(msg, got)
            except Exception:
                log.exception("workers: message %r failed", raw_msg[:80])
                for s in got:
                    s.close()
            if self.closed:
                return

    def _lost(self) -> None:
        if not self.closed:
            self.close()
            self.on_closed()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        for s in self._fds:
            s.close()
        for _packet, fds in self._out:
            for fd in fds:
                os.close(fd)
        self._out.clear()
        self.queued = 0
