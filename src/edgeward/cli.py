"""The `edgeward` command.

Exit codes (also in the README):
  0  success
  1  runtime failure (cannot bind, admin API error)
  2  invalid config or usage
  3  the running edge's admin API cannot be reached
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .admin.client import AdminUnreachable
from .admin.client import admin_request as _admin_request
from .config.loader import ConfigError
from .config.schema import json_schema

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
    from .app import load_config
    try:
        return load_config(path)
    except ConfigError as e:
        for p in e.problems:
            typer.echo(str(p), err=True)
        typer.echo(f"{len(e.problems)} problem(s) in {path}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
def check(config: ConfigArg) -> None:
    """Validate a config without binding anything; print every problem as file:line:col."""
    cfg = _load_or_exit(config)
    from .app import build_runtime
    rt = build_runtime(cfg)
    typer.echo(f"{config}: OK ({len(cfg.services)} services, {len(rt.listeners)} listening ports, {len(rt.pools)} pools)")


@app.command()
def nft(config: ConfigArg,
        mark: Annotated[str, typer.Option(help="The fwmark for replies to transparent sockets.")] = "0x7e",
        table: Annotated[int, typer.Option(help="The routing table where every address is local.")] = 126,
        apply: Annotated[bool, typer.Option("--apply", help="Run the script (as root) instead of printing it.")]
        = False) -> None:
    """Print what the kernel needs for this config, as a shell script for root: the nftables table of
    services with forward = "kernel" (which `edgeward run` also applies, re-applies on reload and
    removes at stop) and the return path of transparent mode (policy routing and nftables)."""
    cfg = _load_or_exit(config)
    from .kernel_forward import kernel_services
    from .kernel_forward import render as render_kernel
    from .net.transparent import return_path_script
    try:
        fwmark = int(mark, 0)
    except ValueError:
        typer.echo(f"edgeward: --mark {mark!r} is not a number (write e.g. 0x7e)", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    script = return_path_script(cfg, fwmark, table)
    if kernel_services(cfg):
        script += ("# Services with forward = \"kernel\": nftables DNAT in edgeward's own table.\n"
                   f"nft -f - <<'EOF'\n{render_kernel(cfg)}EOF\n")
    if not apply:
        typer.echo(script, nl=False)
        return
    import subprocess
    r = subprocess.run(["/bin/sh", "-e"], input=script.encode(), capture_output=True)
    if r.returncode != 0:
        typer.echo(f"edgeward nft --apply: {r.stderr.decode(errors='replace').strip()}", err=True)
        raise typer.Exit(EXIT_RUNTIME)
    typer.echo("applied")


@app.command()
def schema() -> None:
    """Print the config's JSON Schema (for editors)."""
    typer.echo(json.dumps(json_schema(), indent=2))


import_app = typer.Typer(no_args_is_help=True, help="Carry another tool's configuration over to edgeward's.")
app.add_typer(import_app, name="import")


@import_app.command("fail2ban")
def import_fail2ban(path: Annotated[Path, typer.Argument(
        help="fail2ban's jail.local, jail.conf or their directory (e.g. /etc/fail2ban).")]) -> None:
    """Print fail2ban's enabled jails as [jails.*] tables (jail.conf, jail.d/, jail.local, [DEFAULT] and
    %(...)s as fail2ban reads them); what does not carry over is said in comments."""
    from .guard.fail2ban_jails import JailImportError, import_jails, render
    try:
        typer.echo(render(import_jails(str(path))), nl=False)
    except JailImportError as e:
        typer.echo(f"edgeward import fail2ban: {e}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
def run(config: ConfigArg,
        demo: Annotated[bool, typer.Option(help="Also start the built-in demo upstreams (for examples/demo.toml).")] = False,
        log_level: Annotated[str | None, typer.Option(help="Override edge.log_level.")] = None) -> None:
    """Run the edge in the foreground. SIGHUP reloads, SIGTERM drains, SIGINT stops."""
    # The same path `edgeward run` takes without the CLI's libraries (entry.py).
    from .daemon import run as run_daemon
    code = run_daemon(config, demo, log_level)
    if code:
        raise typer.Exit(code)


@app.command(hidden=True)
def worker(config: ConfigArg,
           control_fd: Annotated[int, typer.Option(help="The master's control socket.")],
           index: Annotated[int, typer.Option(help="This worker's number.")] = 0,
           log_level: Annotated[str | None, typer.Option(help="The master's log level.")] = None) -> None:
    """A data-plane worker of `edgeward run` with [edge] workers > 1 (started by the master)."""
    # The master starts workers through entry.py, without the CLI's libraries; this is the same code.
    from .daemon import run_worker
    code = run_worker(config, control_fd, index, log_level)
    if code:
        raise typer.Exit(code)


def admin_request(method: str, path: str, admin: str | None, config: Path | None, token: str | None,
                  body: Any = None) -> tuple[int, Any]:
    """A request to the running edge's admin API, found with --admin or from --config."""
    if admin is None and config is not None:
        cfg = _load_or_exit(config)
        admin = cfg.edge.admin
        token = token or cfg.edge.admin_token
    try:
        return _admin_request(method, path, admin, token, body)
    except AdminUnreachable as e:
        typer.echo(f"edgeward: {e}", err=True)
        raise typer.Exit(EXIT_ADMIN) from None


def _console() -> Any:
    """Rich output for a terminal; piped (a file, a pager, grep), tables take the width they need
    instead of 80 columns, so no name is cut."""
    from rich.console import Console
    return Console() if sys.stdout.isatty() else Console(width=1000, no_color=True, soft_wrap=True)


def _print_status(st: dict[str, Any]) -> None:
    from rich.table import Table

    from .admin.top import human_rate
    con = _console()
    con.print(f"edgeward {st['version']}  up {st['uptime']}s  connections {st['connections']}  "
              f"udp sessions {st.get('udp_sessions', 0)}  clients {st['clients']}  "
              f"in {human_rate(st.get('in_rate', 0))}  out {human_rate(st.get('out_rate', 0))}  "
              f"open-files limit {st['nofile']['soft']}  splice {st['splice']}")
    t = Table("service", "action", "pool", "clients", "active", "udp sessions", "total", "http requests",
              "bytes in", "bytes out", "in/s", "out/s", title="services")
    for name, s in st["services"].items():
        t.add_row(name, s.get("action", ""), s["pool"] or "-", str(s.get("clients", 0)), str(s["active"]),
                  str(s.get("udp_sessions", 0)), str(s["total"]), str(s.get("requests", 0)), str(s["bytes_in"]),
                  str(s["bytes_out"]), human_rate(s.get("in_rate", 0)), human_rate(s.get("out_rate", 0)))
    con.print(t)
    t = Table("pool", "server", "state", "clients", "active", "udp sessions", "total", "bytes in", "bytes out",
              "in/s", "out/s", title="servers")
    for pname, p in st["pools"].items():
        for s in p["servers"]:
            state = "drain" if s["drain"] else ("up" if s["available"] else "DOWN")
            t.add_row(pname, s["server"], state, str(s.get("clients", 0)), str(s["active"]),
                      str(s.get("udp_sessions", 0)), str(s["total"]), str(s["bytes_in"]), str(s["bytes_out"]),
                      human_rate(s.get("in_rate", 0)), human_rate(s.get("out_rate", 0)))
    con.print(t)
    workers = st.get("workers")
    if workers:  # [edge] workers = N
        t = Table("worker", "pid", "restarts", "hung", "connections", "udp sessions", "clients", "total", "refused",
                  "reloads", "rss KiB", "bans/health in (ms, max)", "reports dropped",
                  title=f"workers ({workers['alive']} of {workers['count']} running, {workers['restarts']} restarts)")
        for w in workers.get("processes", ()):
            # stale: the worker did not answer in time; these are its previous figures
            t.add_row(str(w["index"]) + (" (stale)" if w.get("stale") else ""), str(w["pid"]), str(w["restarts"]),
                      str(w.get("hung", 0)), str(w["connections"]), str(w["udp_sessions"]), str(w["clients"]),
                      str(w["total"]), str(w["refused"]), str(w["reloads"]), str(w["rss_kib"]),
                      f"{w['propagation_ms'].get('max', 0):.2f}", str(w.get("dropped_reports", 0)))
        con.print(t)
    web = st.get("web") or {}
    certs = (web.get("certificates") or {}).get("certificates") or {}
    acme = web.get("acme") or {}
    if certs or acme:
        t = Table("name / certificate", "source", "state", "valid until", "last error", "next attempt",
                  title="certificates")
        for slot, c in certs.items():
            if not slot.startswith("acme:"):
                t.add_row(", ".join(c["names"]), c["source"], "file", c["not_after"][:19],
                          "; ".join(c.get("warnings", [])), "")
        for name, a in acme.items():
            t.add_row(name, "acme", a["state"], (a.get("not_after") or "")[:19], a.get("last_error") or "",
                      (a.get("next_attempt") or "")[:19])
        con.print(t)
    if st.get("guard"):
        g = st["guard"]
        t = Table("jail", "lines", "failing addresses", "bans", "refused", title="jails")
        for j in g.get("jails", []):
            t.add_row(j["name"], str(j["counters"]["lines"]), str(len(j.get("failures", {}))),
                      str(len(j.get("bans", []))), str(j["counters"]["refused"]))
        con.print(t)
        if g.get("share"):
            _print_share(con, g["share"])
        cs = g.get("crowdsec")
        if cs:
            state = "connected" if cs["connected"] else f"NOT CONNECTED ({cs.get('last_error') or 'no poll yet'})"
            t = Table("address", "reason (scenario)", "origin", "until",
                      title=f"crowdsec {cs['lapi_url']}: {state}; {cs['decisions']} decision(s) ({cs['ranges']} "
                            f"range(s)), refused {cs['refused']}, errors {cs['errors']}")
            import time as _t
            for d in cs.get("recent", []):
                t.add_row(d["address"], d["reason"], d["origin"], _t.strftime("%F %T", _t.localtime(d["end"])))
            con.print(t)
    if st["counters"]:
        t = Table("event", "count", title="counters")
        for c in st["counters"]:
            t.add_row(" ".join(c["key"]), str(c["value"]))
        con.print(t)


def _print_share(con: Any, sh: dict[str, Any]) -> None:
    """[guard.share]: the link to Redis and what crossed it."""
    from rich.table import Table
    state = "connected" if sh["connected"] else f"DOWN ({sh.get('last_error') or 'not reached yet'})"
    if not sh["connected"] and sh.get("retry_in") is not None:
        state += f", retry in {sh['retry_in']:.1f}s"
    t = Table("node", "redis", "state", "bans held, by origin", "sent bans/unbans", "received bans/unbans",
              "failures", "merges", title="shared bans")
    held = ", ".join(f"{k} {v}" for k, v in (sh.get("bans_by_origin") or {}).items()) or "none"
    t.add_row(sh["node"], sh["redis"], state, held, f"{sh['sent']['bans']}/{sh['sent']['unbans']}",
              f"{sh['received']['bans']}/{sh['received']['unbans']}", str(sh["failures"]), str(sh["merges"]))
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
def clients(service: Annotated[str | None, typer.Option("--service", "-s", help="Only this service's clients.")] = None,
            address: Annotated[str | None, typer.Option("--address", "-a", help="Only this client address.")] = None,
            limit: Annotated[int, typer.Option(help="List at most this many connections and sessions.")] = 100,
            admin: AdminOpt = None, config: CfgOpt = None, token: TokenOpt = None,
            as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Who is on now: live connections and UDP sessions (address, service, since, bytes, upstream)."""
    from urllib.parse import urlencode
    q = urlencode({k: v for k, v in (("service", service), ("address", address), ("limit", str(limit))) if v})
    code, data = admin_request("GET", f"/clients?{q}", admin, config, token)
    if code != 200:
        typer.echo(f"edgeward: {data.get('error') if isinstance(data, dict) else data}", err=True)
        raise typer.Exit(EXIT_RUNTIME)
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    import time as _t

    from rich.table import Table
    shown = len(data["clients"])
    t = Table("address", "port", "transport", "service", "upstream", "since", "bytes in", "bytes out",
              title=f"{data['distinct']} distinct address(es), {data['matched']} connection(s) and session(s)"
                    + (f", {shown} shown" if shown < data["matched"] else ""))
    for c in data["clients"]:
        t.add_row(c["address"], str(c["port"]), c["transport"], c["service"], c["upstream"],
                  _t.strftime("%F %T", _t.localtime(c["since"])), str(c["bytes_in"]), str(c["bytes_out"]))
    _console().print(t)


@app.command()
def top(admin: AdminOpt = None, config: CfgOpt = None, token: TokenOpt = None,
        interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.2)] = 1.0) -> None:
    """A live view refreshed in place: services, clients, throughput, server health, recent bans (q quits)."""
    if admin is None and config is not None:
        cfg = _load_or_exit(config)
        admin = cfg.edge.admin
        token = token or cfg.edge.admin_token
    from .admin.top import run_top
    try:
        run_top(admin, token, interval)
    except KeyboardInterrupt:
        pass


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
    from rich.table import Table
    shared = any(b.get("origin") for b in data)  # [guard.share]: which node banned
    t = Table("address", "jail", *(["origin"] if shared else []), "since", "until", "reason",
              title=f"{len(data)} ban(s)")
    import time as _t
    for b in data:
        until = "forever" if b.get("end") is None else _t.strftime("%F %T", _t.localtime(b["end"]))
        t.add_row(b["address"], b["jail"], *([str(b.get("origin") or "")] if shared else []),
                  _t.strftime("%F %T", _t.localtime(b["start"])), until, str(b.get("reason", ""))[:80])
    _console().print(t)


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
