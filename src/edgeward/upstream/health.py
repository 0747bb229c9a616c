"""Active health checks: TCP connect or HTTP GET, per server, on an interval.

An https:// server (an HTTP service's upstream) is checked over TLS with the settings its
requests use (`Pool.tls`: CA, pin, SNI, or verify = false): a plain GET to a TLS port would
mark it down, and a certificate its requests would refuse makes it unhealthy too.

Runs in the control plane (asyncio streams are fine here); the data plane only
reads `Server.healthy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import Awaitable, Callable

from ..config.schema import HealthCheck
from ..config.units import Target
from .pool import Pool, Server, UpstreamTls

HealthListener = Callable[[Pool, Server, bool], None]
# Opens a stream to a target (net/sockets.py's `open_stream`: the edge passes it in, so that every
# socket is made in one place while this module stays below the network layer), over TLS when given
# a context and the name to ask for and check.
Connector = Callable[[Target, int | None, ssl.SSLContext | None, str | None],
                     Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def _asyncio_connect(t: Target, port: int | None, tls: ssl.SSLContext | None = None,
                           server_name: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if t.unix_path is not None:
        return await asyncio.open_unix_connection(t.unix_path)
    assert t.host is not None and port is not None
    return await asyncio.open_connection(t.host, port, ssl=tls, server_hostname=server_name if tls else None)


def _tls_for(server: Server, tls: UpstreamTls | None) -> tuple[ssl.SSLContext | None, str | None, bytes | None]:
    """Context, SNI and pin for checking `server`: none for plain servers; for an https:// server,
    the pool's settings, or the system's CAs when the HTTP layer gave none."""
    if server.target.scheme != "https":
        return None, None, None
    if tls is None:
        return ssl.create_default_context(), server.target.host, None
    return tls.context, tls.server_name or server.target.host, tls.pin


def _pin_matches(writer: asyncio.StreamWriter, pin: bytes) -> bool:
    obj = writer.get_extra_info("ssl_object")
    der = obj.getpeercert(binary_form=True) if obj is not None else None
    return der is not None and hashlib.sha256(der).digest() == pin

log = logging.getLogger("edgeward.health")


async def check_once(server: Server, hc: HealthCheck, connect: Connector = _asyncio_connect,
                     tls: UpstreamTls | None = None) -> bool:
    t = server.target
    port = hc.port or t.port
    context, server_name, pin = _tls_for(server, tls)
    try:
        async with asyncio.timeout(hc.timeout):
            reader, writer = await connect(t, port, context, server_name)
            try:
                if pin is not None and not _pin_matches(writer, pin):
                    log.info("health check of %s: certificate does not match upstream_tls.pin", server.name)
                    return False
                if hc.http is None:
                    return True
                host = hc.host or (t.host if t.host and ":" not in t.host else f"[{t.host}]")
                writer.write(f"GET {hc.http} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: edgeward-health\r\n"
                             f"Connection: close\r\n\r\n".encode())
                await writer.drain()
                status_line = await reader.readline()
                parts = status_line.split(None, 2)
                return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == str(hc.expect).encode()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):  # ssl.SSLError is an OSError
        return False


class HealthChecker:
    """One task per checked pool; marks servers up/down after rise/fall results and tells `on_change`."""

    def __init__(self, pools: list[Pool], on_change: HealthListener | None = None,
                 connect: Connector = _asyncio_connect) -> None:
        self.pools = [p for p in pools if isinstance(p.health, HealthCheck)]
        self.on_change = on_change
        self.connect = connect
        self._tasks: list[asyncio.Task[None]] = []
        self._streak: dict[int, int] = {}

    def start(self) -> None:
        for p in self.pools:
            self._tasks.append(asyncio.get_running_loop().create_task(self._run(p)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    async def _run(self, pool: Pool) -> None:
        hc = pool.health
        assert isinstance(hc, HealthCheck)
        while True:
            results = await asyncio.gather(*(check_once(s, hc, self.connect, pool.tls) for s in pool.servers))
            for s, ok in zip(pool.servers, results, strict=True):
                self._apply(pool, s, ok, hc)
            await asyncio.sleep(hc.interval)

    def _apply(self, pool: Pool, s: Server, ok: bool, hc: HealthCheck) -> None:
        # streak > 0 counts successes while down, < 0 counts failures while up.
        k = id(s)
        streak = self._streak.get(k, 0)
        if ok == s.healthy:
            self._streak[k] = 0
            return
        streak = streak + 1 if ok else streak - 1
        if (ok and streak >= hc.rise) or (not ok and -streak >= hc.fall):
            s.healthy = ok
            streak = 0
            log.warning("pool %s server %s is now %s", pool.name, s.name, "UP" if ok else "DOWN")
            if self.on_change is not None:
                self.on_change(pool, s, ok)
        self._streak[k] = streak
