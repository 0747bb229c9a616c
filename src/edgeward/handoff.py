"""Receive client connections handed over by edgeward (the server side of a handoff endpoint).

A local server listens on a Unix socket; for each client routed to it, edgeward connects,
sends the client's TCP socket (SCM_RIGHTS) with a record saying what it knows (service,
SNI/ALPN/Host, the client's address, the listener's address), and waits for a one-byte
acknowledgement. Once acknowledged, edgeward closes its copy: the server owns the
connection as if it had accepted it itself. The client's first bytes (a TLS ClientHello,
an HTTP request) are still unread in the socket, and `getpeername()` is the client's.

Blocking, like `socket.accept()`::

    with HandoffReceiver("/run/myapp/handoff.sock") as rx:
        while True:
            sock, meta = rx.accept()
            ...  # sock is a connected TCP socket; meta.client, meta.name, meta.alpn...

asyncio, each connection becomes a normal connection of your protocol
(`loop.connect_accepted_socket`, TLS included)::

    server = await serve_handoffs("/run/myapp/handoff.sock", lambda meta: MyProtocol(), ssl=ctx)

A received socket is acknowledged before anything is read from it, and only a
successfully sent acknowledgement commits the handoff: when the edge gave up
waiting (it then serves the client another way), sending the acknowledgement
fails and the received socket is closed here, never served twice. The wire format
is docs/handoff-protocol.md; `edgeward.codec.handoff` is its reference codec.

This module imports nothing of the edge: servers may use it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl as _ssl
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .codec import NEED_MORE
from .codec.handoff import MAX_RECORD, Ack, HandoffError, HandoffRecord, build_ack, parse_record

__all__ = [
    "Ack",
    "HandoffError",
    "HandoffReceiver",
    "HandoffRecord",
    "HandoffServer",
    "receive",
    "serve_handoffs",
    "start_handoff_server",
]

log = logging.getLogger("edgeward.handoff")

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_MAX_FDS = 4  # room to notice (and close) a sender that attaches more than the one socket
Decide = Callable[[HandoffRecord], Ack]


def _default_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _peer_uid(ctl: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(ctl.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


def listen_unix(path: str, mode: int = 0o660, backlog: int = 128) -> socket.socket:
    """A listening Unix stream socket at `path` (a stale socket file there is replaced; any
    other kind of file is an error), with permissions `mode`."""
    if not path.startswith("@"):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind("\0" + path[1:] if path.startswith("@") else path)
        if not path.startswith("@"):
            os.chmod(path, mode)
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


class _Reader:
    """Accumulates one record (and the socket attached to its first byte) from a control connection."""

    __slots__ = ("buf", "fds")

    def __init__(self) -> None:
        self.buf = b""
        self.fds: list[int] = []

    def feed(self, ctl: socket.socket) -> HandoffRecord | None:
        """Read what is there; the record once complete. Raises HandoffError, OSError (BlockingIOError)."""
        data, fds, flags, _ = socket.recv_fds(ctl, MAX_RECORD - len(self.buf), _MAX_FDS,
                                              getattr(socket, "MSG_CMSG_CLOEXEC", 0))
        self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise HandoffError("control data truncated")
        if not data:
            raise HandoffError("the edge closed the control connection before a whole record")
        self.buf += data
        rec = parse_record(self.buf)
        if rec is NEED_MORE:
            if len(self.buf) >= MAX_RECORD:
                raise HandoffError("record too long")
            return None
        assert isinstance(rec, HandoffRecord)
        if rec.length != len(self.buf):
            raise HandoffError("bytes after the record")
        if len(self.fds) != 1:
            raise HandoffError(f"{len(self.fds)} descriptors attached (1 expected)")
        return rec

    def take(self) -> socket.socket:
        fd = self.fds.pop()
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise
        if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
            s.close()
            raise HandoffError("the descriptor handed over is not a TCP socket")
        return s

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def _commit(ctl: socket.socket, sock: socket.socket) -> bool:
    """Send ACCEPTED; True if it went out (the handoff is then ours), else `sock` is closed."""
    try:
        sent = ctl.send(build_ack(Ack.ACCEPTED), socket.MSG_NOSIGNAL)
    except OSError:
        sent = 0
    if sent != 1:
        sock.close()  # the edge gave up waiting and serves the client itself
        return False
    return True


def _refuse(ctl: socket.socket, status: Ack) -> None:
    with contextlib.suppress(OSError):
        ctl.send(build_ack(status), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)


def receive(ctl: socket.socket, decide: Decide | None = None,
            timeout: float = 5.0) -> tuple[socket.socket, HandoffRecord]:
    """One handoff from a connected control socket (blocking, at most `timeout` seconds).

    `decide(record)` may refuse it (returns an Ack other than ACCEPTED; the edge then serves
    the client another way). Returns the client socket (blocking mode) and its record.
    Raises HandoffError (bad record, refused, edge gone) or OSError; the control socket is
    left to the caller to close."""
    reader = _Reader()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandoffError("no complete record in time")
            ctl.settimeout(left)
            try:
                rec = reader.feed(ctl)
            except TimeoutError:
                raise HandoffError("no complete record in time") from None
            except HandoffError:
                _refuse(ctl, Ack.BAD_RECORD)
                raise
            if rec is not None:
                break
        try:
            sock = reader.take()
        except HandoffError:
            _refuse(ctl, Ack.BAD_RECORD)
            raise
    finally:
        reader.close()
    status = decide(rec) if decide is not None else Ack.ACCEPTED
    if status != Ack.ACCEPTED:
        sock.close()
        _refuse(ctl, status)
        raise HandoffError(f"refused ({status.name})")
    if not _commit(ctl, sock):
        raise HandoffError("the edge gave up before the acknowledgement")
    sock.settimeout(None)  # blocking, like socket.accept(); the edge no longer touches it
    return sock, rec


class HandoffReceiver:
    """A handoff endpoint, blocking: `accept()` returns the next handed-over connection.

    Only processes of `allowed_uids` (default: root and this process's user) may hand
    connections over, checked with SO_PEERCRED, and the socket file gets `mode`: the record
    says who the client is, so whoever may write it must be trusted."""

    def __init__(self, path: str, *, mode: int = 0o660, backlog: int = 128,
                 allowed_uids: Iterable[int] | None = None, timeout: float = 5.0,
                 decide: Decide | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.decide = decide
        self.allowed_uids = frozenset(allowed_uids) if allowed_uids is not None else _default_uids()
        self.sock = listen_unix(path, mode, backlog)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, HandoffRecord]:
        """Wait for the next connection handed over; bad or refused handoffs are logged and skipped."""
        while True:
            ctl, _ = self.sock.accept()
            with ctl:
                try:
                    if _peer_uid(ctl) not in self.allowed_uids:
                        raise HandoffError(f"sender uid {_peer_uid(ctl)} is not allowed")
                    return receive(ctl, self.decide, self.timeout)
                except (HandoffError, OSError) as e:
                    log.warning("handoff on %s not taken: %s", self.path, e)

    def close(self) -> None:
        self.sock.close()
        if not self.path.startswith("@"):
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __enter__(self) -> HandoffReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HandoffServer:
    """The asyncio side: every handed-over connection is given to `on_socket` on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, path: str,
                 on_socket: Callable[[socket.socket, HandoffRecord], None], *,
                 allowed_uids: frozenset[int], timeout: float, decide: Decide | None) -> None:
        self.loop = loop
        self.sock = sock
        self.path = path
        self.on_socket = on_socket
        self.allowed_uids = allowed_uids
        self.timeout = timeout
        self.decide = decide
        self.pending: dict[socket.socket, tuple[_Reader, asyncio.TimerHandle]] = {}
        self.received = 0
        self.rejected = 0
        self._closed = asyncio.Event()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                ctl, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept on %s: %s", self.path, e)
                return
            ctl.setblocking(False)
            try:
                uid = _peer_uid(ctl)
            except OSError:
                ctl.close()
                continue
            if uid not in self.allowed_uids:
                log.warning("handoff on %s from uid %d refused (not allowed)", self.path, uid)
                self.rejected += 1
                ctl.close()
                continue
            timer = self.loop.call_later(self.timeout, self._expire, ctl)
            self.pending[ctl] = (_Reader(), timer)
            self.loop.add_reader(ctl.fileno(), self._on_control, ctl)

    def _drop(self, ctl: socket.socket) -> None:
        entry = self.pending.pop(ctl, None)
        if entry is not None:
            reader, timer = entry
            timer.cancel()
            reader.close()
            self.loop.remove_reader(ctl.fileno())
        ctl.close()

    def _expire(self, ctl: socket.socket) -> None:
        log.warning("handoff on %s: no complete record in %.1fs", self.path, self.timeout)
        self.rejected += 1
        self._drop(ctl)

    def _on_control(self, ctl: socket.socket) -> None:
        reader, _ = self.pending[ctl]
        try:
            rec = reader.feed(ctl)
        except BlockingIOError:
            return
        except (HandoffError, OSError) as e:
            log.warning("handoff on %s not taken: %s", self.path, e)
            self.rejected += 1
            _refuse(ctl, Ack.BAD_RECORD)
            self._drop(ctl)
            return
        if rec is None:
            return
        try:
            sock = reader.take()
        except (HandoffError, OSError) as e:
            log.warning("handoff on %s not taken: %s", self.path, e)
            self.rejected += 1
            _refuse(ctl, Ack.BAD_RECORD)
            self._drop(ctl)
            return
        status = self.decide(rec) if self.decide is not None else Ack.ACCEPTED
        if status != Ack.ACCEPTED:
            sock.close()
            self.rejected += 1
            _refuse(ctl, status)
            self._drop(ctl)
            return
        committed = _commit(ctl, sock)
        self._drop(ctl)
        if not committed:
            self.rejected += 1
            return
        self.received += 1
        sock.setblocking(False)
        try:
            self.on_socket(sock, rec)
        except Exception:
            log.exception("handoff on %s: the connection handler failed", self.path)
            sock.close()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            if not self.path.startswith("@"):
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        for ctl in list(self.pending):
            self._drop(ctl)
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def serve_forever(self) -> None:
        try:
            await self._closed.wait()
        finally:
            self.close()

    async def __aenter__(self) -> HandoffServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def serve_handoffs(path: str, protocol_factory: Callable[[HandoffRecord], asyncio.BaseProtocol], *,
                         ssl: _ssl.SSLContext | None = None, mode: int = 0o660, backlog: int = 128,
                         allowed_uids: Iterable[int] | None = None, timeout: float = 5.0,
                         decide: Decide | None = None,
                         ssl_handshake_timeout: float | None = None) -> HandoffServer:
    """Listen at `path`; make each handed-over connection a connection of `protocol_factory(record)`
    with `loop.connect_accepted_socket` (TLS with `ssl`, exactly as for an accepted socket)."""
    loop = asyncio.get_running_loop()

    def on_socket(sock: socket.socket, rec: HandoffRecord) -> None:
        coro = loop.connect_accepted_socket(lambda: protocol_factory(rec), sock, ssl=ssl,
                                            ssl_handshake_timeout=ssl_handshake_timeout if ssl else None)
        task = loop.create_task(coro)
        task.add_done_callback(lambda t: _report(t, sock))

    def _report(task: asyncio.Task[Any], sock: socket.socket) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.info("handed-over connection failed to start: %s", task.exception())
            sock.close()

    return HandoffServer(loop, listen_unix(path, mode, backlog), path, on_socket,
                         allowed_uids=frozenset(allowed_uids) if allowed_uids is not None else _default_uids(),
                         timeout=timeout, decide=decide)


async def start_handoff_server(
        client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter, HandoffRecord], Awaitable[None]],
        path: str, *, ssl: _ssl.SSLContext | None = None, limit: int = 2 ** 16, **kw: Any) -> HandoffServer:
    """Like `asyncio.start_unix_server`, for handed-over connections: `client_connected_cb(reader,
    writer, record)` runs for each (TLS with `ssl`)."""
    loop = asyncio.get_running_loop()

    def factory(rec: HandoffRecord) -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, lambda r, w: client_connected_cb(r, w, rec), loop=loop)

    return await serve_handoffs(path, factory, ssl=ssl, **kw)
