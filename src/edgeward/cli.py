"""The `edgeward` command.

Exit codes (also in the README):
  0  success
  1  runtime failure (cannot bind, admin API error)
  2  invalid config or usage
  3  the running edge's admin API cannot be reached
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .config.loader import ConfigError, load
from .config.schema import json_schema
from .guard.validate import config_problems

app = typer.Typer(add_completion=False, no_args_is_help=True, help="edgeward: one edge daemon for self-hosters.")

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG, EXIT_ADMIN = 0, 1, 2, 3

ConfigArg = Annotated[Path, typer.Argument(help="The TOML config file.")]
AdminOpt = Annotated[str | None, typer.Option("--admin", help="Admin address (default: from --config, else 127.0.0.1:9901).")]
CfgOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Read the admin address and token from this config.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="EDGEWARD_ADMIN_TOKEN", help="Admin bearer token.")]


def _version_cb(value: bool) -> None:
    if value:
        typer.echo(f"edgeward {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version_cb, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


def _load_or_exit(path: Path) -> Any:
    try:
        return load(path, checks=(config_problems,))
    except ConfigError as e:
        for p in e.problems:
            typer.echo(str(p), err=True)
        typer.echo(f"{len(e.problems)} problem(s) in {path}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
def check(config: ConfigArg) -> None:
    """Validate a config without binding anything; print every problem as file:line:col."""
    cfg = _load_or_exit(config)
    from .server import build_runtime
    rt = build_runtime(cfg)
    typer.echo(f"{config}: OK ({len(cfg.services)} services, {len(rt.listeners)} listening ports, {len(rt.pools)} pools)")


@app.command()
def schema() -> None:
    """Print the config's JSON Schema (for editors)."""
    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def run(config: ConfigArg,
        demo: Annotated[bool, typer.Option(help="Also start the built-in demo upstreams (for examples/demo.toml).")] = False,
        log_level: Annotated[str | None, typer.Option(help="Override edge.log_level.")] = None) -> None:
    """Run the edge in the foreground. SIGHUP reloads, SIGTERM drains, SIGINT stops."""
    cfg = _load_or_exit(config)
    logging.basicConfig(level=(log_level or cfg.edge.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        runner = asyncio.run
    try:
        runner(_serve(str(config), cfg, demo))
    except _StartError as e:
        typer.echo(f"edgeward: {e}", err=True)
        raise typer.Exit(EXIT_RUNTIME) from None


class _StartError(Exception):
    pass


async def _serve(path: str, cfg: Any, demo: bool) -> None:
    from .admin.api import AdminAPI
    from .server import BindError, Edge
    demo_servers = []
    if demo:
        from .demo import start_demo_upstreams
        demo_servers = await start_demo_upstreams()
    edge = Edge(path, cfg, asyncio.get_running_loop())
    extensions = _load_extensions(edge, cfg)
    for ext in extensions:
        await ext.start()
    try:
        await edge.start()
    except ConfigError as e:
        cause = e.__cause__
        raise _StartError(str(cause) if isinstance(cause, BindError) else str(e)) from None
    except OSError as e:
        raise _StartError(f"cannot start: {e}") from None
    admin = AdminAPI(edge, cfg.edge.admin, cfg.edge.admin_token)
    for ext in extensions:
        ext.register(admin)
    try:
        await admin.start()
    except OSError as e:
        await edge.stop()
        raise _StartError(f"cannot open the admin API on {cfg.edge.admin}: {e.strerror or e}") from None
    edge.admin = admin
    edge.install_signals()
    try:
        await edge.wait_stopped()
    finally:
        await admin.stop()
        for ext in extensions:
            await ext.stop()
        for s in demo_servers:
            s.close()


def _load_extensions(edge: Any, cfg: Any) -> list[Any]:
    """Optional parts that plug into the edge (the guard). Kept apart so the core runs without them."""
    exts: list[Any] = []
    try:
        from .guard.integration import GuardExtension
    except ImportError:
        return exts
    ext = GuardExtension.from_config(edge, cfg)
    if ext is not None:
        exts.append(ext)
    return exts


# ---------------------------------------------------------------------- admin client
class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def admin_request(method: str, path: str, admin: str | None, config: Path | None, token: str | None,
                  body: Any = None) -> tuple[int, Any]:
    if admin is None and config is not None:
        cfg = _load_or_exit(config)
        admin = cfg.edge.admin
        token = token or cfg.edge.admin_token
    admin = admin or "127.0.0.1:9901"
    conn: http.client.HTTPConnection
    if admin.startswith("unix:"):
        conn = _UnixHTTPConnection(admin[5:], 10)
    else:
        host, _, port = admin.rpartition(":")
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except OSError as e:
        typer.echo(f"edgeward: cannot reach the admin API at {admin}: {e}", err=True)
        raise typer.Exit(EXIT_ADMIN) from None
    finally:
        conn.close()
    ctype = resp.getheader("Content-Type", "")
    data = json.loads(raw) if ctype.startswith("application/json") and raw else raw.decode()
    return resp.status, data


def _print_status(st: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    con = Console()
    con.print(f"edgeward {st['version']}  up {st['uptime']}s  connections {st['connections']}  "
              f"udp sessions {st.get('udp_sessions', 0)}  clients {st['clients']}  open-files limit {st['nofile']['soft']}  splice {st['splice']}")
    t = Table("service", "pool", "active", "total", "udp sessions", "bytes in", "bytes out", title="services")
    for name, s in st["services"].items():
        t.add_row(name, s["pool"], str(s["active"]), str(s["total"]), str(s.get("udp_sessions", 0)),
                  str(s["bytes_in"]), str(s["bytes_out"]))
    con.print(t)
    t = Table("pool", "server", "state", "active", "udp sessions", "total", "bytes in", "bytes out", title="servers")
    for pname, p in st["pools"].items():
        for s in p["servers"]:
            state = "drain" if s["drain"] else ("up" if s["available"] else "DOWN")
            t.add_row(pname, s["server"], state, str(s["active"]), str(s.get("udp_sessions", 0)), str(s["total"]),
                      str(s["bytes_in"]), str(s["bytes_out"]))
    con.print(t)
    if st.get("guard"):
        g = st["guard"]
        t = Table("jail", "lines", "failing addresses", "bans", "refused", title="jails")
        for j in g.get("jails", []):
            t.add_row(j["name"], str(j["counters"]["lines"]), str(len(j.get("failures", {}))),
                      str(len(j.get("bans", []))), str(j["counters"]["refused"]))
        con.print(t)
    if st["counters"]:
        t = Table("event", "count", title="counters")
        for c in st["counters"]:
            t.add_row(" ".join(c["key"]), str(c["value"]))
        con.print(t)


@app.command()
def status(jail: Annotated[str | None, typer.Argument(help="Show only this jail (failures and bans).")] = None,
           admin: AdminOpt = None, config: CfgOpt = None, token: TokenOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show live connections, clients, services, servers, jails and counters of the running edge."""
    if jail is not None:
        from urllib.parse import quote
        code, data = admin_request("GET", f"/guard?jail={quote(jail)}", admin, config, token)
        if code != 200:
            typer.echo(f"edgeward: {data.get('error') if isinstance(data, dict) else data}", err=True)
            raise typer.Exit(EXIT_RUNTIME)
        typer.echo(json.dumps(data, indent=1))
        return
    code, data = admin_request("GET", "/status", admin, config, token)
    if code != 200:
        typer.echo(f"edgeward: admin API answered {code}: {data}", err=True)
        raise typer.Exit(EXIT_RUNTIME)
    if as_json:
        typer.echo(json.dumps(data, indent=1))
    else:
        _print_status(data)


@app.command()
def reload(admin: AdminOpt = None, config: CfgOpt = None, token: TokenOpt = None) -> None:
    """Ask the running edge to re-read its config (like SIGHUP)."""
    code, _data = admin_request("POST", "/reload", admin, config, token)
    if code != 200:
        typer.echo("edgeward: reload rejected; the running config stays (see the edge's log)", err=True)
        raise typer.Exit(EXIT_CONFIG)
    typer.echo("reloaded")


@app.command()
def drain(pool: str, server: str, admin: AdminOpt = None, config: CfgOpt = None, token: TokenOpt = None,
          undo: Annotated[bool, typer.Option("--undo", help="Take new connections again.")] = False) -> None:
    """Stop sending new connections to a server of a pool (existing ones finish)."""
    from urllib.parse import quote
    code, data = admin_request("POST", f"/pools/{quote(pool)}/{'undrain' if undo else 'drain'}?server={quote(server)}",
                               admin, config, token)
    if code != 200:
        typer.echo(f"edgeward: {data.get('error') if isinstance(data, dict) else data}", err=True)
        raise typer.Exit(EXIT_RUNTIME)
    typer.echo(f"{pool}/{server}: {'draining' if not undo else 'taking connections'}")


@app.command()
def bans(admin: AdminOpt = None, config: CfgOpt = None, token: TokenOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List current bans with their reasons (jail, matched lines, times)."""
    code, data = admin_request("GET", "/bans", admin, config, token)
    if code != 200:
        typer.echo(f"edgeward: admin API answered {code}: {data}", err=True)
        raise typer.Exit(EXIT_RUNTIME)
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table("address", "jail", "since", "until", "reason", title=f"{len(data)} ban(s)")
    import time as _t
    for b in data:
        until = "forever" if b.get("end") is None else _t.strftime("%F %T", _t.localtime(b["end"]))
        t.add_row(b["address"], b["jail"], _t.strftime("%F %T", _t.localtime(b["start"])), until,
                  str(b.get("reason", ""))[:80])
    Console().print(t)


@app.command()
def ban(jail: str, addr: str, admin: AdminOpt = None, config: CfgOpt = None, token: TokenOpt = None,
        bantime: Annotated[str | None, typer.Option(help="Ban length, e.g. 1h (default: the jail's).")] = None,
        reason: Annotated[str, typer.Option(help="Why (kept with the ban).")] = "manual ban") -> None:
    """Ban ADDR in JAIL now (jail "manual" bans forever unless --bantime)."""
    from .config.units import parse_duration
    body: dict[str, Any] = {"jail": jail, "addr": addr, "reason": reason}
    if bantime is not None:
        body["bantime"] = parse_duration(bantime)
    code, data = admin_request("POST", "/ban", admin, config, token, body)
    if code != 200:
        typer.echo(f"edgeward: {data.get('error') if isinstance(data, dict) else data}", err=True)
        raise typer.Exit(EXIT_RUNTIME)
    typer.echo(f"banned {addr} in {jail}")


@app.command()
def unban(addr: Annotated[str | None, typer.Argument(help="The address to unban.")] = None,
          all_: Annotated[bool, typer.Option("--all", help="Lift every ban.")] = False,
          jail: Annotated[str | None, typer.Option(help="Only this jail's ban.")] = None,
          admin: AdminOpt = None, config: CfgOpt = None, token: TokenOpt = None) -> None:
    """Lift the ban of ADDR (or every ban with --all) at once."""
    if (addr is None) == (not all_):
        typer.echo("edgeward: give an address or --all", err=True)
        raise typer.Exit(EXIT_CONFIG)
    code, data = admin_request("POST", "/unban", admin, config, token, {"addr": addr, "all": all_, "jail": jail})
    if code != 200:
        typer.echo(f"edgeward: {data.get('error') if isinstance(data, dict) else data}", err=True)
        raise typer.Exit(EXIT_RUNTIME)
    typer.echo(f"unbanned: {', '.join(data['unbanned']) or 'nothing was banned'}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
