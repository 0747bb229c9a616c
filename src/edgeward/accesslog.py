"""The access log: one line per closed TCP connection, per ended UDP session, per HTTP request.

A subscriber of the event bus. The event loop only appends (time, event) to a
queue; a writer thread formats and writes, so a slow disk never stalls the
data plane. The queue is bounded: past `MAX_PENDING` unwritten lines new ones
are dropped and counted (`dropped`), never buffered without limit.

Text lines are logfmt (`key=value`, values quoted only when they need it), so
they are easy to grep, to parse, and to feed a fail2ban-style filter:

    2026-12-01T12:00:00.123Z tcp client=203.0.113.5:51234 listener=tls service=web upstream=10.0.0.2:443 in=517 out=3120 proto=tls name=cloud.example.org alpn=h2,http/1.1 duration=0.153 end=done

    2026-12-01T12:00:01.456Z http client=203.0.113.5:51240 listener=https service=cloud host=cloud.example.org method=GET path=/index.php status=200 in=412 out=5120 duration=0.042 upstream=10.0.0.5:443

JSON lines carry the same fields.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import sys
import threading
import time
from typing import IO

from .events import ConnClosed, EventBus, HttpRequest, UdpSessionEnded

Logged = ConnClosed | UdpSessionEnded | HttpRequest

log = logging.getLogger("edgeward.accesslog")

MAX_PENDING = 100_000
_STOP = object()
_WAKE = object()  # no line: wakes the writer to reopen the file at once


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def fields(ev: Logged) -> dict[str, object]:
    """The fields of one line, in order."""
    if isinstance(ev, HttpRequest):
        return _http_fields(ev)
    out: dict[str, object] = {
        "client": str(ev.peer), "listener": ev.listener, "service": ev.service or "-",
        "upstream": ev.upstream or "-", "in": ev.bytes_in, "out": ev.bytes_out,
    }
    if isinstance(ev, UdpSessionEnded):
        out["datagrams_in"] = ev.datagrams_in
        out["datagrams_out"] = ev.datagrams_out
    elif ev.protocol:  # what sniffing found (a listener that routes by port alone sniffs nothing)
        out["proto"] = ev.protocol
        if ev.name:
            out["name"] = ev.name
        if ev.alpn:
            out["alpn"] = ev.alpn
    out["duration"] = round(ev.duration, 3)
    out["end"] = ev.reason
    if ev.peer.via_proxy:
        out["via"] = "proxy"  # the client address came from a trusted PROXY header
    return out


def _http_fields(ev: HttpRequest) -> dict[str, object]:
    out: dict[str, object] = {
        "client": str(ev.peer), "listener": ev.listener, "service": ev.service or "-", "scheme": ev.scheme,
        "host": ev.host or "-", "method": ev.method, "path": ev.path + ("?" + ev.query if ev.query else ""),
        "status": ev.status, "in": ev.bytes_in, "out": ev.bytes_out, "duration": round(ev.duration, 3),
        "upstream": ev.upstream or "-",
    }
    if ev.upgraded:
        out["upgraded"] = 1
    if ev.error:
        out["error"] = ev.error
    if ev.peer.via_proxy:
        out["via"] = "proxy"
    return out


def _kind(ev: Logged) -> str:
    return "udp" if isinstance(ev, UdpSessionEnded) else "http" if isinstance(ev, HttpRequest) else "tcp"


def _logfmt_value(v: object) -> str:
    s = str(v)
    if s and not any(c in s for c in ' "=\\\n\t'):
        return s
    return json.dumps(s)


def format_text(t: float, ev: Logged) -> str:
    return f"{_ts(t)} {_kind(ev)} " + " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields(ev).items())


def format_json(t: float, ev: Logged) -> str:
    return json.dumps({"time": _ts(t), "kind": _kind(ev), **fields(ev)}, separators=(",", ":"))


class AccessLog:
    """Writes access-log lines to a file (appending; reopened by `reopen`: on SIGUSR1 and on reload,
    for logrotate), or to standard output ("-") or standard error ("stderr")."""

    def __init__(self, path: str, fmt: str = "text") -> None:
        self.path = path
        self.format = format_json if fmt == "json" else format_text
        self.dropped = 0
        self.written = 0
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._out: IO[str] | IO[bytes] = self._open()
        self._reopen = False
        self._thread = threading.Thread(target=self._run, name="edgeward-accesslog", daemon=True)
        self._unsubscribe: list[object] = []

    def _open(self) -> IO[str] | IO[bytes]:
        if self.path in ("-", "stdout"):
            return sys.stdout
        if self.path == "stderr":  # with the edge's own log (journald keeps both under systemd)
            return sys.stderr
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        # Unbuffered: each batch of whole lines is one write(2) with O_APPEND, so that the workers of
        # `workers = N`, appending to the same file, never cut each other's lines.
        return os.fdopen(fd, "ab", buffering=0)

    def attach(self, bus: EventBus) -> None:
        q = self._q

        def put(ev: Logged) -> None:
            if q.qsize() >= MAX_PENDING:
                self.dropped += 1
                return
            q.put((time.time(), ev))
        self._unsubscribe = [bus.subscribe(ConnClosed, put), bus.subscribe(UdpSessionEnded, put),
                             bus.subscribe(HttpRequest, put)]
        self._thread.start()

    def reopen(self) -> None:
        """Reopen the file at its path (after logrotate moved it): done by the writer thread, at once."""
        self._reopen = True
        self._q.put(_WAKE)

    def close(self) -> None:
        for unsub in self._unsubscribe:
            unsub()  # type: ignore[operator]
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(5)
        if self._out not in (sys.stdout, sys.stderr):
            self._out.close()

    def _run(self) -> None:
        q = self._q
        out = self._out
        while True:
            item = q.get()
            batch = [item]
            while len(batch) < 4096:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            stop = False
            lines = []
            for it in batch:
                if it is _STOP:
                    stop = True
                    continue
                if it is _WAKE:
                    continue
                assert isinstance(it, tuple)
                lines.append(self.format(it[0], it[1]))
            try:
                if self._reopen and out not in (sys.stdout, sys.stderr):
                    self._reopen = False
                    out.close()
                    out = self._out = self._open()
                if lines:
                    text = "\n".join(lines) + "\n"
                    if isinstance(out, io.RawIOBase):
                        data = memoryview(text.encode())
                        while data:
                            n = out.write(data)
                            if not n:
                                raise OSError("the access log took no bytes")
                            data = data[n:]
                    else:
                        out.write(text)  # type: ignore[call-overload]
                        out.flush()
                    self.written += len(lines)
            except (OSError, ValueError) as e:
                self.dropped += len(lines)
                log.error("access log %s: %s", self.path, e)
            if stop:
                return
