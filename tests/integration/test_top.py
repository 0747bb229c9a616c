"""`edgeward top` in a pseudo-terminal: it draws in place and its numbers follow the traffic."""

from __future__ import annotations

import fcntl
import os
import re
import select
import socket
import struct
import subprocess
import termios
import time
from pathlib import Path

from support import EDGEWARD, EdgeProcess, ThreadServer, connect_from, echo_handler, free_port

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>78]")


class Terminal:
    """A program on a pseudo-terminal of 140x50; `screen_until` reads its output."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 140, 0, 0))
        env = dict(os.environ, TERM="xterm-256color", COLUMNS="140", LINES="50")
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                                     close_fds=True)
        os.close(slave)
        self.raw = b""

    def read_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.master], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the program exited: EIO on the master
                return
            if not chunk:
                return
            self.raw += chunk

    def screen_until(self, pattern: str, timeout: float = 10.0) -> str:
        """Read until the text (escape codes removed) of what was drawn since the call matches."""
        start = len(self.raw)
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_for(0.2)
            text = ANSI.sub(b"", self.raw[start:]).decode(errors="replace")
            if rx.search(text):
                return text
        raise AssertionError(f"{pattern!r} never drawn; last output:\n{ANSI.sub(b'', self.raw[-4000:]).decode(errors='replace')}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)


def test_top_shows_live_clients_throughput_health_and_bans(tmp_path: Path) -> None:
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    e = EdgeProcess(tmp_path, f"""
[edge]
admin = "127.0.0.1:{admin}"
state_dir = "{tmp_path / 'state'}"
[pools.app]
servers = ["127.0.0.1:{up.port}", "127.0.0.1:{free_port()}"]
health = {{ interval = "0.3s", timeout = "1s" }}  # (the down server refuses at once)
[services.echo]
listen = ["127.0.0.1:{port}"]
to = "app"
""", admin_port=admin, wait=[("127.0.0.1", port)])
    code, _ = e.api("POST", "/ban", {"jail": "manual", "addr": "192.0.2.66", "reason": "seen in the test"})
    assert code == 200
    term = Terminal([*EDGEWARD, "top", "--admin", f"127.0.0.1:{admin}", "--interval", "0.3"])
    conns: list[socket.socket] = []
    try:
        # Nobody on yet; the server with nothing behind it is DOWN, the manual ban is listed.
        text = term.screen_until(r"echo\s*│\s*0\s*│\s*0\s*│")
        text = term.screen_until(r"DOWN")
        assert "192.0.2.66" in text and "manual" in text and "seen in the test" in text
        assert re.search(rf"127\.0\.0\.1:{up.port}\s*│\s*up", text)
        assert b"\x1b[?1049h" in term.raw  # drawn on the alternate screen, in place (not scrolling)
        # Three connections from two addresses: 2 clients, 3 connections, and bytes moving.
        conns = [connect_from("127.0.0.31", port), connect_from("127.0.0.31", port), connect_from("127.0.0.32", port)]
        for c in conns:
            c.sendall(b"z" * 20_000)
            got = 0
            while got < 20_000:
                got += len(c.recv(65536))
        text = term.screen_until(r"echo\s*│\s*2\s*│\s*3\s*│\s*0\s*│\s*[1-9][0-9.]* (B|kB|MB)/s")
        assert "clients 2  connections 3" in text
        for c in conns:
            c.close()
        term.screen_until(r"echo\s*│\s*0\s*│\s*0\s*│")
        os.write(term.master, b"q")
        assert term.proc.wait(10) == 0
        term.read_for(0.5)
        assert b"\x1b[?1049l" in term.raw[-200:]  # the terminal's screen restored
        # Piped, it prints one screen and exits.
        out = subprocess.run([*EDGEWARD, "top", "--admin", f"127.0.0.1:{admin}"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        assert "services" in out and re.search(r"echo\s*│\s*0\s*│", out) and "\x1b[" not in out
    finally:
        for c in conns:
            c.close()
        term.close()
        e.stop()
        up.close()
