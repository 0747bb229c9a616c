"""The dashboard: one page on the admin listener, its assets, and its live numbers as server-sent events.

No build step and nothing from elsewhere: the page, its script, its style sheet and
its icon are files of this package (`admin/static/`), served by the admin API with a
Content-Security-Policy that allows only them. The page loads the last hour from
`/history` and then follows `/events`, where one view a second is pushed to every
open dashboard: the view is built once per second whoever watches (not once per
browser), and only while at least one is open. A browser that does not keep up
loses views (its queue holds two), never makes the edge buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import unquote

from ..edge import Edge
from ..monitor import Monitor
from ..status import read_status

log = logging.getLogger("edgeward.admin")

COOKIE = "edgeward_admin"
MAX_STREAMS = 32
RECENT_BANS = 10
INTERVAL = 1.0

# Only the dashboard's own files, no inline script or style, no framing.
PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)

_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
          "svg": "image/svg+xml"}
_ASSETS = frozenset({"index.html", "login.html", "app.js", "app.css", "icon.svg"})


def cookie_token(header: str) -> str | None:
    """The admin token from the dashboard's cookie in a Cookie header, if any."""
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return unquote(morsel.value) if morsel is not None else None


class Dashboard:
    def __init__(self, edge: Edge, monitor: Monitor, bans: Callable[[int], Awaitable[tuple[int, list[dict[str, Any]]]]]) -> None:
        self.edge = edge
        self.monitor = monitor
        self.bans = bans
        self._assets: dict[str, tuple[bytes, str]] = {}
        self._queues: set[asyncio.Queue[bytes]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._pusher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ files
    def asset(self, name: str) -> tuple[bytes, str] | None:
        if name not in _ASSETS:
            return None
        got = self._assets.get(name)
        if got is None:
            # Imported when the dashboard is first opened: importlib.resources brings tempfile, shutil
            # and the compression modules, about 1 MB of RSS a daemon nobody looks at need not carry.
            from importlib import resources
            data = resources.files(__package__).joinpath("static", name).read_bytes()
            got = self._assets[name] = (data, _TYPES[name.rsplit(".", 1)[1]])
        return got

    def login_page(self, error: str = "") -> bytes:
        page = self.asset("login.html")
        assert page is not None
        return page[0].replace(b"<!--error-->", error.encode())

    # ------------------------------------------------------------------ live numbers
    async def view(self) -> dict[str, Any]:
        """What the page shows, from the same status the API serves."""
        st = await read_status(self.edge, self.monitor, full=False)
        in_force, bans = await self.bans(RECENT_BANS)
        history = self.monitor.history
        return {
            "time": round(time.time(), 1), "version": st["version"], "uptime": st["uptime"],
            "clients": st["clients"], "connections": st["connections"], "udp_sessions": st["udp_sessions"],
            "in_rate": st["in_rate"], "out_rate": st["out_rate"],
            "services": {name: {k: s[k] for k in ("clients", "active", "udp_sessions", "requests", "in_rate",
                                                  "out_rate", "bytes_in", "bytes_out", "pool")}
                         for name, s in st["services"].items()},  # type: ignore[attr-defined]
            "pools": {name: {"clients": p["clients"], "servers": [
                {k: s[k] for k in ("server", "healthy", "available", "drain", "clients", "active", "udp_sessions",
                                   "in_rate", "out_rate")} for s in p["servers"]]}
                      for name, p in st["pools"].items()},  # type: ignore[attr-defined]
            "bans": [{k: b.get(k) for k in ("address", "jail", "reason", "start", "end")} for b in bans],
            "bans_in_force": in_force,
            "point": history[-1] if history else None,
            "step": self.monitor.step,
        }

    def can_stream(self) -> bool:
        return len(self._queues) < MAX_STREAMS

    async def stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One browser's event stream: a view a second until it leaves (or the admin API stops)."""
        q: asyncio.Queue[bytes] = asyncio.Queue(maxsize=2)
        self._queues.add(q)
        self._writers.add(writer)
        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.get_running_loop().create_task(self._push())
        gone = asyncio.ensure_future(reader.read(1))  # the browser sends nothing more: EOF = it left
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
                         b"X-Accel-Buffering: no\r\nConnection: close\r\n\r\nretry: 2000\n\n")
            await writer.drain()
            while True:
                nxt = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    nxt.cancel()
                    return
                writer.write(b"data: " + nxt.result() + b"\n\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            gone.cancel()
            self._queues.discard(q)
            self._writers.discard(writer)

    async def _push(self) -> None:
        while self._queues:
            try:
                data = json.dumps(await self.view(), separators=(",", ":")).encode()
            except Exception:  # a failing view must not end every stream
                log.exception("dashboard: building the view failed")
                data = b'{"error":"the edge could not build its view; see its log"}'
            for q in list(self._queues):
                if q.full():
                    q.get_nowait()  # a slow browser skips a view rather than queueing them
                q.put_nowait(data)
            await asyncio.sleep(INTERVAL)

    async def close(self) -> None:
        for w in list(self._writers):
            w.close()
        if self._pusher is not None:
            self._pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pusher
