"""`edgeward top`: a live terminal view of the running edge, refreshed in place (rich's Live).

A client of the admin API like every other command: each refresh reads `/status` and `/bans`
once (the edge samples its throughput every second while someone reads it). `q` or Ctrl-C quits.
Piped (not a terminal), it prints one screen and exits.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .client import AdminUnreachable, admin_request

Fetch = Callable[[str], tuple[int, Any]]

RECENT_BANS = 8


def human_rate(bps: float) -> str:
    """Bytes per second as people read them: 0 B/s, 512 B/s, 1.2 kB/s, 3.4 MB/s."""
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if bps < 1000 or unit == "GB/s":
            return f"{bps:.0f} {unit}" if unit == "B/s" else f"{bps:.1f} {unit}"
        bps /= 1000
    return ""  # pragma: no cover - the loop always returns


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def render(st: dict[str, Any] | None, bans: list[dict[str, Any]], error: str | None = None,
           now: float | None = None, in_force: int | None = None) -> RenderableType:
    """One screen of `top` from a `/status` answer and the newest bans (`in_force`: how many there are
    in all; default len(bans))."""
    parts: list[RenderableType] = []
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    if st is None:
        return Text(f"edgeward top  {stamp}\n\n{error or 'waiting for the admin API...'}", style="bold red")
    head = Text(f"edgeward {st['version']}  {stamp}  up {int(st['uptime'])}s  ", style="bold")
    head.append(f"clients {st['clients']}  connections {st['connections']}  udp sessions {st['udp_sessions']}  "
                f"in {human_rate(st.get('in_rate', 0))}  out {human_rate(st.get('out_rate', 0))}")
    if error:
        head.append(f"  ({error})", style="red")
    parts.append(head)
    t = Table("service", "clients", "conns", "udp", "in/s", "out/s", "bytes in", "bytes out", "pool",
              title="services", title_justify="left", expand=True)
    for name, s in sorted(st["services"].items(), key=lambda kv: (-kv[1].get("clients", 0), kv[0])):
        t.add_row(name, str(s.get("clients", 0)), str(s["active"]), str(s.get("udp_sessions", 0)),
                  human_rate(s.get("in_rate", 0)), human_rate(s.get("out_rate", 0)), human_bytes(s["bytes_in"]),
                  human_bytes(s["bytes_out"]), s.get("pool") or "-")
    parts.append(t)
    t = Table("pool", "server", "health", "clients", "conns", "udp", "in/s", "out/s",
              title="servers", title_justify="left", expand=True)
    for pname, p in st["pools"].items():
        for s in p["servers"]:
            if s["drain"]:
                health = Text("drain", style="yellow")
            elif s["available"]:
                health = Text("up", style="green")
            else:
                health = Text("DOWN", style="bold red")
            t.add_row(pname, s["server"], health, str(s.get("clients", 0)), str(s["active"]),
                      str(s.get("udp_sessions", 0)), human_rate(s.get("in_rate", 0)), human_rate(s.get("out_rate", 0)))
    parts.append(t)
    t = Table("address", "jail", "since", "reason", title=f"recent bans ({len(bans) if in_force is None else in_force} in force)",
              title_justify="left", expand=True)
    for b in sorted(bans, key=lambda b: -float(b.get("start", 0)))[:RECENT_BANS]:
        t.add_row(str(b.get("address", "")), str(b.get("jail", "")),
                  time.strftime("%H:%M:%S", time.localtime(float(b.get("start", 0)))), str(b.get("reason", "")))
    parts.append(t)
    return Group(*parts)


def snapshot(fetch: Fetch) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str | None, None, int]:
    """render()'s arguments: the status, the newest bans, an error, the time (now), the bans in force.
    Only the newest bans travel: with a CrowdSec blocklist there may be tens of thousands."""
    try:
        code, st = fetch("/status")
        if code != 200 or not isinstance(st, dict):
            return None, [], f"admin API answered {code}: {st}", None, 0
        code, bans = fetch(f"/bans?newest={RECENT_BANS}")
        if code == 200 and isinstance(bans, dict):
            return st, list(bans["bans"]), None, None, int(bans["total"])
        return st, [], None, None, 0
    except AdminUnreachable as e:
        return None, [], str(e), None, 0


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """Wait up to a timeout for a key press (cbreak mode on a terminal; nothing otherwise)."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else -1
    if fd < 0:
        def sleep(timeout: float) -> str:
            time.sleep(timeout)
            return ""
        yield sleep
        return
    import termios
    import tty
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 16).decode(errors="replace") if ready else ""
    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top(admin: str | None, token: str | None, interval: float = 1.0, iterations: int | None = None) -> None:
    """Refresh until `q`, Ctrl-C or `iterations` refreshes."""
    def fetch(path: str) -> tuple[int, Any]:
        return admin_request("GET", path, admin, token, timeout=5.0)
    console = Console()
    if not console.is_terminal:  # piped: one screen, like `top -b -n 1`, full width
        Console(width=200, no_color=True, soft_wrap=True).print(render(*snapshot(fetch)))
        return
    done = 0
    with _keys() as key, Live(render(*snapshot(fetch)), console=console, screen=True,
                              auto_refresh=False, transient=False) as live:
        while iterations is None or done < iterations:
            live.update(render(*snapshot(fetch)), refresh=True)
            done += 1
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                if key(left).lower().startswith("q"):
                    return
