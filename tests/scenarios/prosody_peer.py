"""Debian's prosody as a real peer (own config, data dir and log in a temp dir) and a slixmpp
client whose TCP source address can be chosen, so each test client is a distinct loopback address.

Used by the scenario 04 test; kept apart so the tests that extend it (BOSH with X-Forwarded-For,
transparent c2s) can start the same prosody.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import slixmpp

from support import require, wait_port


@dataclass
class Prosody:
    proc: subprocess.Popen[bytes]
    config: Path
    log: Path
    c2s_port: int
    domain: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def failed_logins(self, addr: str) -> int:
        """mod_log_auth lines naming `addr` (what the edge's prosody-auth filter counts)."""
        return len(re.findall(rf"Failed authentication attempt \(.*\) for user \S+ from IP: {re.escape(addr)}$",
                              self.text(), re.M))


def _config(tmp: Path, c2s_port: int, domain: str) -> str:
    # Lua, read by prosody and prosodyctl alike. Points that bit while writing it:
    # - run_as_root: as root, prosodyctl would switch to the `prosody` user, which cannot read
    #   pytest's 0700 tmp dirs, and mod_posix refuses to run as root without it.
    # - interfaces: only loopback; s2s is disabled so nothing listens on 5269 or 0.0.0.0.
    # - no certificate on purpose: without TLS prosody offers no STARTTLS, and
    #   allow_unencrypted_plain_auth lets the client try SASL PLAIN in clear (loopback only).
    # - log_auth_ips = "failure" is mod_log_auth's default; set anyway so the intent is explicit.
    # - the file log is line-buffered by prosody, so a failure is in the file when the
    #   client reads <failure/>.
    return f"""
run_as_root = true
daemonize = false
pidfile = "{tmp}/prosody.pid"
data_path = "{tmp}/data"
certificates = "{tmp}/certs"
log = {{ info = "{tmp}/prosody.log" }}
interfaces = {{ "127.0.0.1" }}
local_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s_port} }}
modules_enabled = {{ "roster", "saslauth", "disco", "ping", "posix", "log_auth" }}
modules_disabled = {{ "s2s" }}
log_auth_ips = "failure"
authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
allow_registration = false

VirtualHost "{domain}"
"""


@contextlib.contextmanager
def prosody(tmp: Path, c2s_port: int, users: dict[str, str], domain: str = "example.org") -> Iterator[Prosody]:
    """Run prosody in the foreground on 127.0.0.1:`c2s_port` with `users` registered; stopped by PID."""
    exe = require("prosody")
    ctl = require("prosodyctl")
    root = tmp / "prosody"
    for d in ("data", "certs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    cfg = root / "prosody.cfg.lua"
    cfg.write_text(_config(root, c2s_port, domain))
    for user, password in users.items():
        # Offline registration writes the account file directly; prosody reads it at login.
        subprocess.run([ctl, "--config", str(cfg), "register", user, domain, password], check=True,
                       capture_output=True, timeout=20)
    log = root / "prosody.log"
    with open(root / "prosody.out", "wb") as out:
        p = subprocess.Popen([exe, "--config", str(cfg), "-F"], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port("127.0.0.1", c2s_port, 15)
            yield Prosody(p, cfg, log, c2s_port, domain)
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


class _BoundLoop(asyncio.SelectorEventLoop):
    """An event loop whose outgoing TCP connections leave from `source`: slixmpp has no option for
    a source address, but it opens its stream with loop.create_connection()."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    async def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("local_addr", (self.source, 0))
        return await super().create_connection(*args, **kwargs)


def xmpp_login(source: str, port: int, jid: str, password: str, timeout: float = 5.0) -> bool | None:
    """One slixmpp login from `source` to 127.0.0.1:`port` with SASL PLAIN (one mechanism, so one
    failure per call). True: session started; False: authentication failed; None: the connection
    was closed or never got as far as authenticating."""
    loop = _BoundLoop(source)
    try:
        client = slixmpp.ClientXMPP(jid, password, sasl_mech="PLAIN", loop=loop)
        client.plugin["feature_mechanisms"].unencrypted_plain = True
        client.enable_direct_tls = False
        result: asyncio.Future[bool | None] = loop.create_future()

        def settle(value: bool | None) -> None:
            if not result.done():
                result.set_result(value)

        client.add_event_handler("session_start", lambda _e: settle(True))
        client.add_event_handler("failed_all_auth", lambda _e: settle(False))
        client.add_event_handler("disconnected", lambda _e: settle(None))
        client.add_event_handler("connection_failed", lambda _e: settle(None))
        client.connect("127.0.0.1", port)
        try:
            outcome = loop.run_until_complete(asyncio.wait_for(result, timeout))
        except TimeoutError:
            outcome = None
        # disconnect() also cancels a pending (re)connection attempt; its future ends when the
        # stream is closed or after `wait`.
        with contextlib.suppress(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(client.disconnect(wait=1), 3))
        return outcome
    finally:
        # Let slixmpp's background tasks end inside the loop instead of warning at close.
        tasks = asyncio.all_tasks(loop)
        for t in tasks:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()


def wait_for(pred: Any, timeout: float = 5.0, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())
