"""TLS termination of one client connection: between the loop's plain transport and ClientConnection.

The edge could hand the socket to the loop with `ssl=` (uvloop's SSL protocol), and did. This
does the same work on memory BIOs (`SSLContext.wrap_bio`, as uvloop does), compiled with the HTTP
layer, for two costs uvloop pays on every read (about 1.7 µs per request: docs/architecture.md):

- uvloop reads decrypted data until OpenSSL says it wants more, and that answer is an exception:
  `SSLWantReadError`, which `_ssl` builds with a formatted message and attributes (~1.3 µs). Here
  a read stops when the incoming BIO holds nothing more (`pending`), so a whole request costs no
  exception (one only when a record is cut between two reads).
- `ssl.SSLObject.read` and `.write` are Python functions wrapping the C object's; this calls the
  C object's (`SSLObject._sslobj`) directly.

The transport side is the subset of asyncio.Transport that ClientConnection uses. A TLS
connection cannot half-close (`can_write_eof()` is False), but an EOF from the client, with or
without its close_notify, is passed to ClientConnection, which may keep the connection open to
answer a request it already has (as on plain HTTP; uvloop closed at once). Handshake failures,
timeouts and clients that leave before finishing it are counted by the proxy as
`tls_handshake_failed`, and nothing of the connection is left.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any, cast

from .timer import Timer

if TYPE_CHECKING:
    from .exchange import ClientConnection
    from .proxy import HttpProxy

# A TLS record carries at most 16 KiB of plaintext, and OpenSSL returns one record per read.
RECORD = 16 * 1024


class TlsTransport:
    """The protocol of a client's TCP transport and the transport of its ClientConnection. Not a
    subclass of asyncio's classes (the loop and ClientConnection only call its methods): so mypyc
    compiles it to a native class."""

    __slots__ = ("app", "closing", "incoming", "obj", "outgoing", "proxy", "raw", "ready", "sslobj", "timer")

    def __init__(self, proxy: HttpProxy, app: ClientConnection, context: ssl.SSLContext) -> None:
        self.proxy = proxy
        self.app = app
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        # The C object behind ssl.SSLObject (the SNI callback still gets the SSLObject: it owns it).
        self.obj: Any = getattr(self.sslobj, "_sslobj", self.sslobj)
        self.raw: asyncio.Transport | None = None
        self.ready = False  # the handshake is done and ClientConnection has this transport
        self.closing = False
        self.timer: Timer[TlsTransport] | None = None

    # --- the loop's side: protocol of the plain transport -----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        self.timer = Timer(self.proxy.wheel, self, TlsTransport._handshake_timeout)
        self.timer.start("handshake", self.proxy.settings.header_timeout, idle=False)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.incoming.write(data)
        if not self.ready:
            self._handshake()
            if not self.ready or self.closing or not self.incoming.pending:
                return
        self._read()

    def eof_received(self) -> bool | None:
        if not self.ready:
            self._failed(ConnectionResetError("the client closed the connection during the TLS handshake"))
            return None
        if self.closing:
            return None
        return self.app.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        reported = self.closing  # before the handshake ends, only _failed sets it (and reported)
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.raw = None
        if self.ready:
            self.app.connection_lost(exc)
        elif not reported:
            self.proxy.tls_failed(self.app, exc or ConnectionResetError("the client left during the TLS handshake"))

    def pause_writing(self) -> None:
        if self.ready:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.ready:
            self.app.resume_writing()

    # --- TLS ---------------------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()  # the server's flight, or nothing yet
            return
        except (ssl.SSLError, ssl.CertificateError, ValueError) as e:
            self._flush()  # the alert, when OpenSSL made one
            self._failed(e)
            return
        self.ready = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._flush()  # the server's Finished, session tickets
        self.app.connection_made(cast(asyncio.BaseTransport, self))

    def _read(self) -> None:
        """Decrypt every whole record received and hand the plaintext over in one call."""
        obj = self.obj
        incoming = self.incoming
        data = b""
        parts: list[bytes] | None = None
        eof = False
        try:
            # A read of RECORD bytes takes a whole record's plaintext, so OpenSSL never keeps part of
            # one (obj.pending() stays 0): what is left to decrypt is what the BIO holds.
            while incoming.pending:
                chunk: bytes = obj.read(RECORD)
                if not chunk:
                    eof = True  # close_notify
                    break
                if not data:
                    data = chunk
                elif parts is None:
                    parts = [data, chunk]
                else:
                    parts.append(chunk)
        except ssl.SSLWantReadError:
            pass  # the rest of a record is still on its way
        except ssl.SSLZeroReturnError:
            eof = True  # close_notify, in a state where _ssl raises rather than returning b""
        except ssl.SSLError:
            # A record that does not decrypt, or an alert: what came before it is still the
            # client's; the connection ends.
            self.proxy.counters["tls_errors"] += 1
            self._flush()
            if parts is not None:
                data = b"".join(parts)
            if data:
                self.app.data_received(data)
            self.abort()
            return
        if self.outgoing.pending:
            self._flush()  # what reading made OpenSSL answer (a key update)
        if parts is not None:
            data = b"".join(parts)
        if data:
            self.app.data_received(data)
        if eof and not self.closing and self.raw is not None and not self.app.eof_received():
            self.close()

    def _flush(self) -> None:
        raw = self.raw
        if self.outgoing.pending and raw is not None:
            raw.write(self.outgoing.read())

    def _failed(self, exc: BaseException) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        raw = self.raw
        if raw is not None:
            # The alert (if any) goes out with the close; connection_lost reports the failure.
            raw.close()
        self.proxy.tls_failed(self.app, exc)

    def _handshake_timeout(self, kind: str) -> None:
        if not self.ready and not self.closing:
            self._failed(TimeoutError("TLS handshake timeout"))

    # --- ClientConnection's side: its transport -----------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closing or not self.ready:
            return
        try:
            self.obj.write(data)  # a memory BIO takes it all: one record per 16 KiB
        except ssl.SSLError:
            self.abort()  # the session failed (an alert was received)
            return
        raw = self.raw
        if raw is not None:
            raw.write(self.outgoing.read())

    def writelines(self, parts: list[bytes]) -> None:
        if self.closing or not self.ready:
            return
        obj = self.obj
        try:
            for p in parts:
                obj.write(p)
        except ssl.SSLError:
            self.abort()
            return
        self._flush()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        raw = self.raw
        if raw is None:
            return
        if self.ready:
            try:
                self.obj.shutdown()  # close_notify; the client's is not waited for
            except (ssl.SSLError, ValueError):
                pass
            self._flush()
        raw.close()

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def is_closing(self) -> bool:
        return self.closing or self.raw is None or self.raw.is_closing()

    def pause_reading(self) -> None:
        if self.raw is not None and not self.closing:
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if self.raw is not None and not self.closing:
            self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw is not None and self.raw.is_reading()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("a TLS connection cannot half-close")

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size() if self.raw is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.raw is not None:
            self.raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "ssl_object":
            return self.sslobj
        if name == "sslcontext":
            return self.sslobj.context
        if name == "peercert":
            return self.sslobj.getpeercert()
        if name == "cipher":
            return self.sslobj.cipher()
        return self.raw.get_extra_info(name, default) if self.raw is not None else default
