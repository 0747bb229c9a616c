"""Debian's prosody as a real peer (own config, data dir and log in a temp dir), a slixmpp client
and a small BOSH client whose TCP source address can be chosen, so each test client is a distinct
loopback address.

Used by the scenario 04 tests: c2s straight to prosody (test_04_xmpp_bruteforce_ban.py) and BOSH
behind the edge's HTTP proxy, with prosody taking the client address from X-Forwarded-For
(test_04_over_http.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import logging
import random
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import slixmpp

from support import require, wait_port

log = logging.getLogger("tests.prosody_peer")


@dataclass
class Prosody:
    proc: subprocess.Popen[bytes]
    config: Path
    log: Path
    c2s_port: int
    domain: str
    http_port: int | None = None  # BOSH (mod_bosh on mod_http), plain HTTP on loopback

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def failed_logins(self, addr: str) -> int:
        """mod_log_auth lines naming `addr` (what the edge's prosody-auth filter counts)."""
        return len(re.findall(rf"Failed authentication attempt \(.*\) for user \S+ from IP: {re.escape(addr)}$",
                              self.text(), re.M))


def _bosh_config(http_port: int, domain: str) -> str:
    # BOSH on plain HTTP, loopback only: TLS is the edge's job.
    # - https_ports = {}: mod_http would otherwise also listen on 5281 (a fixed port; and with no
    #   certificate it could not serve it anyway).
    # - trusted_proxies: the edge's connections come from 127.0.0.1; from it (and only from it)
    #   mod_http takes the client address from X-Forwarded-For (the last address that is not a
    #   trusted proxy) and "secure" from X-Forwarded-Proto, before mod_bosh sees the request.
    #   mod_bosh stores that address as session.ip, which mod_log_auth logs. The test clients
    #   therefore use other loopback addresses than 127.0.0.1.
    # - http_default_host: the edge keeps the client's Host (the web name, as in the real setups
    #   where chat.example.org serves the XMPP domain example.org); mod_bosh is on the VirtualHost.
    # - bosh_max_inactivity: sessions the test leaves behind end soon after it.
    return f"""
http_ports = {{ {http_port} }}
http_interfaces = {{ "127.0.0.1" }}
https_ports = {{ }}
trusted_proxies = {{ "127.0.0.1" }}
http_default_host = "{domain}"
bosh_max_inactivity = 30
"""


def _config(tmp: Path, c2s_port: int, domain: str, http_port: int | None = None) -> str:
    # Lua, read by prosody and prosodyctl alike. Points that bit while writing it:
    # - run_as_root: as root, prosodyctl would switch to the `prosody` user, which cannot read
    #   pytest's 0700 tmp dirs, and mod_posix refuses to run as root without it.
    # - interfaces: only loopback; s2s is disabled so nothing listens on 5269 or 0.0.0.0.
    # - no certificate on purpose: without TLS prosody offers no STARTTLS, and
    #   allow_unencrypted_plain_auth lets the client try SASL PLAIN in clear (loopback only).
    # - log_auth_ips = "failure" is mod_log_auth's default; set anyway so the intent is explicit.
    # - the file log is line-buffered by prosody, so a failure is in the file when the
    #   client reads <failure/>.
    modules = ["roster", "saslauth", "disco", "ping", "posix", "log_auth"] + (["bosh"] if http_port else [])
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
modules_enabled = {{ {", ".join(f'"{m}"' for m in modules)} }}
modules_disabled = {{ "s2s" }}
log_auth_ips = "failure"
authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
allow_registration = false
{_bosh_config(http_port, domain) if http_port else ""}
VirtualHost "{domain}"
"""


@contextlib.contextmanager
def prosody(tmp: Path, c2s_port: int, users: dict[str, str], domain: str = "example.org",
            http_port: int | None = None) -> Iterator[Prosody]:
    """Run prosody in the foreground on 127.0.0.1:`c2s_port` with `users` registered; stopped by PID.
    With `http_port`, also BOSH at http://127.0.0.1:`http_port`/http-bind, trusting 127.0.0.1's
    X-Forwarded-For."""
    exe = require("prosody")
    ctl = require("prosodyctl")
    root = tmp / "prosody"
    for d in ("data", "certs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    cfg = root / "prosody.cfg.lua"
    cfg.write_text(_config(root, c2s_port, domain, http_port))
    for user, password in users.items():
        # Offline registration writes the account file directly; prosody reads it at login.
        subprocess.run([ctl, "--config", str(cfg), "register", user, domain, password], check=True,
                       capture_output=True, timeout=20)
    log = root / "prosody.log"
    with open(root / "prosody.out", "wb") as out:
        p = subprocess.Popen([exe, "--config", str(cfg), "-F"], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port("127.0.0.1", c2s_port, 15)
            if http_port is not None:
                wait_port("127.0.0.1", http_port, 15)
            yield Prosody(p, cfg, log, c2s_port, domain, http_port)
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


# --- BOSH (XEP-0124 sessions, XEP-0206 XMPP over them) -------------------------------------------

BOSH_NS = "http://jabber.org/protocol/httpbind"
XBOSH_NS = "urn:xmpp:xbosh"
STREAM_NS = "http://etherx.jabber.org/streams"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"


class BoshError(Exception):
    """The server answered otherwise than a BOSH client expects (HTTP error, terminate, no features)."""


class _Connection(http.client.HTTPConnection):
    """http.client over a connection to 127.0.0.1:`port` from `source`, TLS with SNI `host` when
    `tls` is given; Host is `host` too (the name the edge routes on). Reconnects the same way if
    the server closes a keep-alive connection between requests."""

    def __init__(self, host: str, port: int, source: str, tls: ssl.SSLContext | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.source, self.tls = source, tls
        self.connects = 0

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout, (self.source, 0))
        try:
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.host) if self.tls else sock
        except BaseException:
            sock.close()
            raise
        self.connects += 1


class BoshClient:
    """A minimal BOSH client of a few requests: one keep-alive HTTP(S) connection from `source`,
    one request in flight at a time. With hold=1 the server keeps that request until it has
    something to say (at once for features, SASL results and iq results) or `wait` seconds pass.

    `headers` go on every request (a test forges X-Forwarded-For with them)."""

    def __init__(self, source: str, port: int, host: str, domain: str, *, ca: Path | None = None,
                 path: str = "/http-bind", wait: int = 10, timeout: float = 15.0,
                 headers: dict[str, str] | None = None) -> None:
        tls = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
        self.conn = _Connection(host, port, source, tls, timeout)
        self.domain, self.path, self.wait = domain, path, wait
        self.headers = {"Content-Type": "text/xml; charset=utf-8", **(headers or {})}
        self.rid = random.randint(1 << 20, 1 << 40)  # XEP-0124 §7: a large random start, +1 per request
        self.sid: str | None = None
        self.features: ET.Element | None = None

    def __enter__(self) -> BoshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def request(self, payload: str = "", **attrs: str) -> ET.Element:
        """POST one <body/> wrapping `payload`; the server's <body/>. Attribute names may carry
        the xmpp: prefix (declared here). A terminate from the server is a BoshError."""
        root = self._post(payload, attrs)
        if root.get("type") == "terminate":
            raise BoshError(f"session terminated: {root.get('condition')}")
        return root

    def _post(self, payload: str, attrs: dict[str, str]) -> ET.Element:
        fields = {"rid": str(self.rid), "xmlns": BOSH_NS, "xmlns:xmpp": XBOSH_NS}
        if self.sid is not None:
            fields["sid"] = self.sid
        fields.update(attrs)
        self.rid += 1
        body = "<body " + " ".join(f"{k}={quoteattr(v)}" for k, v in fields.items()) + ">" + payload + "</body>"
        self.conn.request("POST", self.path, body.encode(), self.headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise BoshError(f"HTTP {r.status}: {data[:200]!r}")
        root = ET.fromstring(data)
        if root.tag != f"{{{BOSH_NS}}}body":
            raise BoshError(f"not a BOSH body: {data[:200]!r}")
        return root

    def _await_features(self, root: ET.Element) -> ET.Element:
        # Features normally come in the answer itself; an empty answer (nothing yet) is polled again.
        for _ in range(3):
            features = root.find(f"{{{STREAM_NS}}}features")
            if features is not None:
                return features
            root = self.request()
        raise BoshError("no stream features")

    def open(self) -> ET.Element:
        """Create the session (XEP-0206 §5); the stream features."""
        root = self.request(**{"to": self.domain, "xml:lang": "en", "ver": "1.6", "wait": str(self.wait),
                               "hold": "1", "content": "text/xml; charset=utf-8", "xmpp:version": "1.0"})
        self.sid = root.get("sid")
        if not self.sid:
            raise BoshError("no sid in the session creation response")
        self.features = self._await_features(root)
        return self.features

    def authenticate(self, user: str, password: str) -> bool:
        """SASL PLAIN: True on <success/>, False on <failure/> (prosody has then logged it)."""
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        root = self.request(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{blob}</auth>")
        for _ in range(3):
            if root.find(f"{{{SASL_NS}}}success") is not None:
                return True
            if root.find(f"{{{SASL_NS}}}failure") is not None:
                return False
            root = self.request()
        raise BoshError("no SASL outcome")

    def bind(self) -> str:
        """Restart the stream after SASL (XEP-0206 §5), bind a resource; the full JID."""
        features = self._await_features(self.request(**{"to": self.domain, "xml:lang": "en", "xmpp:restart": "true"}))
        if features.find(f"{{{BIND_NS}}}bind") is None:
            raise BoshError("no resource binding offered after authentication")
        root = self.request(f"<iq xmlns='jabber:client' type='set' id='bind1'><bind xmlns='{BIND_NS}'/></iq>")
        for _ in range(3):
            jid = root.find(f"{{jabber:client}}iq[@id='bind1']/{{{BIND_NS}}}bind/{{{BIND_NS}}}jid")
            if jid is not None and jid.text:
                return jid.text
            root = self.request()
        raise BoshError("no bound JID")

    def ping(self) -> bool:
        """An XEP-0199 ping of the server in the session: True if it answers."""
        root = self.request(f"<iq xmlns='jabber:client' type='get' id='ping{self.rid}' to='{self.domain}'>"
                            "<ping xmlns='urn:xmpp:ping'/></iq>")
        for _ in range(3):
            if root.find("{jabber:client}iq[@type='result']") is not None:
                return True
            root = self.request()
        return False

    def terminate(self) -> None:
        """End the session (XEP-0124 §12); the server confirms with a terminate body."""
        root = self._post("<presence xmlns='jabber:client' type='unavailable'/>", {"type": "terminate"})
        if root.get("type") != "terminate":
            raise BoshError("session not terminated")


def bosh_login(source: str, port: int, host: str, jid: str, password: str, *, ca: Path | None = None,
               headers: dict[str, str] | None = None) -> bool | None:
    """One BOSH login from `source` through 127.0.0.1:`port` (HTTPS trusting `ca`, else plain HTTP)
    with SASL PLAIN: True: authenticated, resource bound, session ended cleanly; False: the
    password was refused; None: the connection was refused, reset or closed, or the server ended
    the session before authentication."""
    user, domain = jid.split("@", 1)
    try:
        with BoshClient(source, port, host, domain, ca=ca, headers=headers) as c:
            c.open()
            if not c.authenticate(user, password):
                return False
            if not c.bind().startswith(jid + "/"):
                raise BoshError("bound to another JID")
            c.terminate()
            return True
    except (OSError, http.client.HTTPException, BoshError) as e:
        # In pytest's captured log when a test fails: why there was no outcome.
        log.info("BOSH login from %s via port %d: %r", source, port, e)
        return None


class BanTimer(threading.Thread):
    """Watches prosody's log for `addr`'s n-th failure line, then runs `refused()` (a probe from
    `addr` through the edge) until it says so: the line-to-ban latency as a client sees it."""

    def __init__(self, peer: Prosody, addr: str, n: int, refused: Callable[[], bool], timeout: float = 15.0) -> None:
        super().__init__(daemon=True)
        self.peer, self.addr, self.n, self.probe, self.timeout = peer, addr, n, refused, timeout
        self.line_seen: float | None = None
        self.refused: float | None = None
        self.probes = 0

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self.peer.failed_logins(self.addr) < self.n:
            time.sleep(0.0005)
        if self.peer.failed_logins(self.addr) < self.n:
            return  # the line never came: the test's assertion says so
        self.line_seen = time.monotonic()
        while time.monotonic() < deadline:
            self.probes += 1
            if self.probe():
                self.refused = time.monotonic()
                return
            time.sleep(0.001)

    def latency_ms(self) -> float | None:
        if self.refused is None or self.line_seen is None:
            return None
        return (self.refused - self.line_seen) * 1000
