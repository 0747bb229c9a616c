"""A stand-alone HTTP edge for tests and benchmarks: an edgeward config's HTTP services served by
`edgeward.http.HttpProxy`, without the rest of the edge.

    python tests/http_harness.py CONFIG [--tls ADDR --cert PEM --key PEM] [--acme-dir DIR]
                                        [--log FILE] [--stats FILE] [--trusted-proxy-header]

Accepts on every `listen` address of the config's HTTP services (address form), hands each socket
to HttpProxy.serve under uvloop (TLS-terminated for the --tls addresses), and on [http] redirect
serves the port-80 mode (redirects + ACME HTTP-01 answers from files in --acme-dir, named by token).
Each HttpRequestLog is written to --log as a JSON line; SIGUSR1 writes HttpProxy.stats() to --stats;
SIGHUP reloads the config into a new HttpProxy and retires the old one (its connections carry on).
With --trusted-proxy-header, a first line "CLIENT ip port\\n" on each plain connection stands for the
real client address an edge would have taken from a trusted PROXY header.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import socket
import ssl
import sys
from pathlib import Path

import uvloop

from edgeward.config.loader import load, resolve_listen, service_scheme
from edgeward.config.schema import Config, PoolSettings
from edgeward.config.units import parse_bind, parse_target
from edgeward.http import HttpProxy, HttpRoute, HttpRoutes, route_for_service
from edgeward.http.log import HttpRequestLog
from edgeward.upstream.pool import Pool, Server


def build_pool(name: str, ps: PoolSettings) -> Pool:
    servers = []
    for item in ps.servers:
        address, weight, drain = (item, 1, False) if isinstance(item, str) else (item.address, item.weight, item.drain)
        servers.append(Server(parse_target(address), weight=weight, drain=drain))
    return Pool(name, servers, balance=ps.balance, connect_timeout=ps.connect_timeout, retries=ps.retries,
                failures_to_down=ps.passive.failures, down_for=ps.passive.down_for)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--tls", action="append", default=[], help="bind address terminated with TLS")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--acme-dir")
    ap.add_argument("--log")
    ap.add_argument("--stats")
    ap.add_argument("--trusted-proxy-header", action="store_true")
    args = ap.parse_args()
    tls_binds = {str(parse_bind(a)) for a in args.tls}

    def build_routes(cfg: Config) -> dict[str, list[HttpRoute]]:
        pools = {name: build_pool(name, ps) for name, ps in cfg.pools.items()}
        per_bind: dict[str, list[HttpRoute]] = {}
        for sname, svc in cfg.services.items():
            if service_scheme(cfg, svc) is None:
                continue
            pool = pools.get(svc.to) or build_pool(f"service:{sname}", PoolSettings(servers=[svc.to]))
            route = route_for_service(sname, svc, pool)
            for item in svc.listen:
                for spec in resolve_listen(cfg, item):
                    per_bind.setdefault(str(spec), []).append(route)
        return per_bind

    cfg = load(args.config)
    per_bind = build_routes(cfg)

    log_file = open(args.log, "a", buffering=1) if args.log else None  # noqa: SIM115 - lives as long as the process

    def on_request(rec: HttpRequestLog) -> None:
        if log_file is not None:
            log_file.write(json.dumps(dataclasses.asdict(rec)) + "\n")

    def acme(token: str) -> str | None:
        if not args.acme_dir:
            return None
        p = Path(args.acme_dir) / token
        return p.read_text() if p.is_file() else None

    uvloop.install()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # What the accept handlers use; a SIGHUP (reload) replaces both, live connections keep theirs.
    state: dict[str, object] = {}

    def install(cfg: Config) -> None:
        per_bind = build_routes(cfg)
        old = state.get("proxy")
        state["proxy"] = HttpProxy(HttpRoutes([r for rs in per_bind.values() for r in rs]), cfg.http,
                                   on_request=on_request, acme_http01=acme, loop=loop)
        state["routes"] = {b: HttpRoutes(rs) for b, rs in per_bind.items()}
        state["terminated"] = HttpRoutes([r for b, rs in per_bind.items() if b in tls_binds for r in rs])
        if isinstance(old, HttpProxy):
            old.retire()
            retired.append(old)

    retired: list[HttpProxy] = []
    install(cfg)
    ssl_ctx = None
    if args.cert:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(args.cert, args.key)
        ssl_ctx.set_alpn_protocols(["http/1.1"])

    listeners: list[socket.socket] = []
    pending: set[asyncio.Task[None]] = set()

    def listen(bind: str, handler: object) -> socket.socket:
        spec = parse_bind(bind)
        fam = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((spec.host, spec.first_port))
        s.listen(1024)
        s.setblocking(False)
        loop.add_reader(s.fileno(), handler, s)
        listeners.append(s)
        return s

    def make_accept(bind: str, tls: bool, redirect: bool, https_port: int):  # type: ignore[no-untyped-def]
        def accept(ls: socket.socket) -> None:
            proxy = state["proxy"]
            assert isinstance(proxy, HttpProxy)
            routes = state["terminated"] if redirect else state["routes"].get(bind, HttpRoutes())  # type: ignore[attr-defined]
            for _ in range(64):
                try:
                    c, addr = ls.accept()
                except (BlockingIOError, InterruptedError):
                    return
                c.setblocking(False)
                local = c.getsockname()
                if args.trusted_proxy_header and not tls and not redirect:
                    t = loop.create_task(read_client_line(c, addr, local, routes, redirect, https_port))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
                    continue
                proxy.serve(c, addr[:2], local[:2], ssl_context=ssl_ctx if tls else None,
                            scheme="https" if tls else "http", redirect_to_https=redirect, routes=routes,
                            https_port=https_port)
        return accept

    async def read_client_line(c: socket.socket, addr: tuple, local: tuple, routes: HttpRoutes, redirect: bool,
                               https_port: int) -> None:
        # Stands for the edge's PROXY header handling: the line is consumed, the rest stays unread.
        line = b""
        while not line.endswith(b"\n") and len(line) < 100:
            line += await loop.sock_recv(c, 1)
            if not line:
                c.close()
                return
        _, ip, port = line.decode().split()
        proxy = state["proxy"]
        assert isinstance(proxy, HttpProxy)
        proxy.serve(c, (ip, int(port)), local[:2], ssl_context=None, scheme="http", redirect_to_https=redirect,
                    client_from_trusted_proxy=True, routes=routes, https_port=https_port)

    https_port = 443
    for bind in per_bind:
        tls = bind in tls_binds
        if tls:
            https_port = parse_bind(bind).first_port
        listen(bind, make_accept(bind, tls, False, 443))
    if cfg.http.redirect != "off":
        listen(cfg.http.redirect, make_accept("", False, True, https_port))

    def write_stats() -> None:
        if args.stats:
            proxy = state["proxy"]
            assert isinstance(proxy, HttpProxy)
            stats = proxy.stats()
            stats["retired"] = [p.stats() for p in retired]
            tmp = Path(args.stats + ".tmp")
            tmp.write_text(json.dumps(stats))
            tmp.rename(args.stats)

    def reload() -> None:
        install(load(args.config))  # the same binds; routes and settings may change
        print("reloaded", flush=True)

    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGUSR1, write_stats)
    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    loop.add_signal_handler(signal.SIGINT, lambda: stop.done() or stop.set_result(None))
    print("ready", flush=True)
    loop.run_until_complete(stop)
    for s in listeners:
        loop.remove_reader(s.fileno())
        s.close()
    for p in [state["proxy"], *retired]:
        assert isinstance(p, HttpProxy)
        p.close_idle_clients()
    loop.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
