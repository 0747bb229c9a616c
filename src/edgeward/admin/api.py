"""The admin API: JSON over HTTP/1.1 on a Unix socket or a loopback port.

Small on purpose (the control plane, not the data plane): one request per
connection, bodies of at most 64 KiB, bearer token when configured. The CLI
(`edgeward status`, `reload`, `ban`, ...) is its client.

Routes:
  GET  /status                      everything `edgeward status` shows
  GET  /clients?service=&address=&limit=
                                    live connections and UDP sessions (address, service, since, bytes,
                                    upstream), and the distinct addresses with their counts
  GET  /history                     the last hour, one point per 10 s (clients, connections, throughput)
  GET  /metrics                     Prometheus text format
  GET  /  (/dashboard)              the dashboard page; /dashboard/* its assets; /events its live
                                    numbers (server-sent events, one a second); /login takes the
                                    token into a cookie that is good for GET requests only
  POST /reload                      re-read the config (as SIGHUP)
  POST /pools/{pool}/drain?server=  stop new connections to a server (undrain: the reverse)
Extra routes are registered by other parts (the guard adds /bans, /ban, /unban).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..admission import normalise_ip
from ..monitor import Monitor
from ..status import read_clients, read_status
from .dashboard import COOKIE, PAGE_HEADERS, Dashboard, cookie_token

if TYPE_CHECKING:
    from ..edge import Edge

log = logging.getLogger("edgeward.admin")

Handler = Callable[[dict[str, list[str]], Any], Awaitable[tuple[int, Any]]]


class Reply(NamedTuple):
    status: int
    body: bytes
    ctype: str
    headers: tuple[tuple[str, str], ...] = ()
    stream: bool = False  # the dashboard's server-sent events


class AdminAPI:
    def __init__(self, edge: Edge, address: str, token: str | None) -> None:
        self.edge = edge
        self.address = address
        self.token = token
        self.server: asyncio.AbstractServer | None = None
        self.monitor = Monitor(edge)
        self.dashboard = Dashboard(edge, self.monitor, self._recent_bans)
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/status"): self._status,
            ("GET", "/clients"): self._clients,
            ("GET", "/history"): self._history,
            ("POST", "/reload"): self._reload,
        }

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    async def start(self) -> None:
        if self.address.startswith("unix:"):
            path = self.address[5:]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.server = await asyncio.start_unix_server(self._handle, path)
            os.chmod(path, 0o600)
        else:
            host, _, port = self.address.rpartition(":")
            self.server = await asyncio.start_server(self._handle, host.strip("[]"), int(port))
        if await self.edge.plane_reports(False) is not None:  # workers: the history is theirs, summed
            self.monitor.point_source = self._history_point
        self.monitor.start()
        log.info("admin API on %s", self.address)

    async def stop(self) -> None:
        await self.dashboard.close()
        await self.monitor.stop()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            if self.address.startswith("unix:"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address[5:])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                reply = await self._serve(reader)
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, ConnectionError):
            reply = Reply(400, b'{"error": "bad request"}', "application/json")
        except Exception as e:  # a handler's failure is an answer, never a dropped connection
            log.exception("admin API: request failed")
            reply = Reply(500, json.dumps({"error": f"internal error: {e}"}).encode(), "application/json")
        try:
            if reply.stream:  # the dashboard's event stream: open until the browser leaves
                await self.dashboard.stream(reader, writer)
                return
            extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers)
            writer.write(f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'OK')}\r\nContent-Type: {reply.ctype}\r\n"
                         f"Content-Length: {len(reply.body)}\r\n{extra}Connection: close\r\n\r\n".encode() + reply.body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _authorized(self, method: str, headers: dict[str, str]) -> bool:
        if self.token is None:
            return True
        given = headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return True
        # The dashboard's cookie (set by /login) is good for reading only: a browser sends cookies
        # with requests other sites make it send, so it must never change anything (SameSite=Strict
        # as well).
        if method == "GET":
            cookie = cookie_token(headers.get("cookie", ""))
            return cookie is not None and hmac.compare_digest(cookie.encode(), self.token.encode())
        return False

    async def _serve(self, reader: asyncio.StreamReader) -> Reply:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > 16384:
            raise ValueError("head too large")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        if length > 65536:
            raise ValueError("body too large")
        raw = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        path = unquote(url.path)
        query = parse_qs(url.query)
        dash = self.dashboard
        if method == "GET" and path.startswith("/dashboard/"):  # static assets: no data in them
            asset = dash.asset(path[len("/dashboard/"):])
            if asset is None:
                return Reply(404, b"not found\n", "text/plain")
            return Reply(200, asset[0], asset[1], PAGE_HEADERS)
        if path == "/login":
            return await self._login(method, raw)
        if not self._authorized(method, headers):
            if method == "GET" and path in ("/", "/dashboard"):
                return Reply(303, b"", "text/plain", (("Location", "/login"),))
            return Reply(401, b'{"error": "missing or wrong bearer token"}', "application/json")
        if method == "GET" and path in ("/", "/dashboard"):
            page = dash.asset("index.html")
            assert page is not None
            return Reply(200, page[0], page[1], PAGE_HEADERS)
        if method == "GET" and path == "/events":
            if not dash.can_stream():
                return Reply(503, b'{"error": "too many dashboards open"}', "application/json")
            return Reply(200, b"", "text/event-stream", stream=True)
        if method == "GET" and path == "/metrics":
            from .metrics import render_metrics  # prometheus_client is imported at the first scrape
            return Reply(200, render_metrics(await read_status(self.edge, self.monitor)), "text/plain; version=0.0.4")
        handler = self.routes.get((method, path))
        if handler is None and method == "POST" and path.startswith("/pools/"):
            parts = path.split("/")
            if len(parts) == 4 and parts[3] in ("drain", "undrain"):
                return self._json(*self._drain(parts[2], parts[3] == "drain", query))
        if handler is None:
            return Reply(404, b'{"error": "no such endpoint"}', "application/json")
        body: Any = json.loads(raw) if raw else None
        status, result = await handler(query, body)
        return self._json(status, result)

    async def _login(self, method: str, raw: bytes) -> Reply:
        """The dashboard's login: a form taking the admin token, kept in an HttpOnly cookie."""
        if self.token is None:
            return Reply(303, b"", "text/plain", (("Location", "/"),))
        if method == "POST":
            given = (parse_qs(raw.decode("utf-8", "replace")).get("token") or [""])[0]
            if hmac.compare_digest(given.encode(), self.token.encode()):
                return Reply(303, b"", "text/plain", (
                    ("Location", "/"),
                    ("Set-Cookie", f"{COOKIE}={quote(self.token, safe='')}; Path=/; HttpOnly; SameSite=Strict"),
                ))
            await asyncio.sleep(1.0)  # a wrong token costs a second: no quick guessing
            return Reply(401, self.dashboard.login_page("Wrong token."), "text/html; charset=utf-8", PAGE_HEADERS)
        if method != "GET":
            return Reply(405, b'{"error": "GET or POST"}', "application/json")
        return Reply(200, self.dashboard.login_page(), "text/html; charset=utf-8", PAGE_HEADERS)

    @staticmethod
    def _json(status: int, result: Any) -> Reply:
        return Reply(status, json.dumps(result, indent=1).encode() + b"\n", "application/json")

    async def _status(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        return 200, await read_status(self.edge, self.monitor)

    async def _clients(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        service = query["service"][0] if query.get("service") else None
        address = query["address"][0] if query.get("address") else None
        try:
            limit = int((query.get("limit") or ["100"])[0])
        except ValueError:
            return 400, {"error": "limit must be an integer"}
        if address is not None:
            address = normalise_ip(address.strip("[]"))
        return 200, await read_clients(self.edge, service, address, limit)

    async def _recent_bans(self, n: int) -> tuple[int, list[dict[str, Any]]]:
        """(bans in force, the newest `n`, newest first), from the guard's /bans when there is a guard."""
        handler = self.routes.get(("GET", "/bans"))
        if handler is None:
            return 0, []
        code, answer = await handler({"newest": [str(n)]}, None)
        if code != 200 or not isinstance(answer, dict):
            return 0, []
        return int(answer["total"]), list(answer["bans"])

    async def _history_point(self) -> dict[str, Any]:
        st = await read_status(self.edge, self.monitor, full=False)
        return {"time": round(time.time(), 1), "clients": st["clients"], "connections": st["connections"],
                "udp_sessions": st["udp_sessions"], "in_rate": st["in_rate"], "out_rate": st["out_rate"],
                "services": {name: s["clients"] for name, s in st["services"].items()}}

    async def _history(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        return 200, {"step": self.monitor.step, "points": list(self.monitor.history)}

    async def _reload(self, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        ok = await self.edge.reload_async()
        return (200 if ok else 422), {"applied": ok}

    def _drain(self, pool: str, drain: bool, query: dict[str, list[str]]) -> tuple[int, Any]:
        server = (query.get("server") or [""])[0]
        if not self.edge.set_drain(pool, server, drain):
            return 404, {"error": f"no server {server!r} in pool {pool!r}"}
        return 200, {"pool": pool, "server": server, "drain": drain}


_REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 422: "Unprocessable Entity", 500: "Internal Server Error",
            503: "Service Unavailable", 507: "Insufficient Storage"}
