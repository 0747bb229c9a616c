"""Support for the HTTP layer's tests: the harness edge as a subprocess, nginx upstreams that report
what they saw, a raw HTTP/1.1 client that reads responses with a strict parser."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httptools

from peers import nginx
from support import ROOT, free_port, open_fds, wait_port, whole_lines

HARNESS = ROOT / "tests" / "http_harness.py"


class HttpEdge:
    """tests/http_harness.py CONFIG: HttpProxy serving a config's HTTP services, in a subprocess."""

    def __init__(self, tmp: Path, config: str, *, tls: list[str] = (), cert: Path | None = None,  # type: ignore[assignment]
                 key: Path | None = None, acme_dir: Path | None = None, wait: list[int] = (),  # type: ignore[assignment]
                 trusted_proxy_header: bool = False) -> None:
        self.tmp = tmp
        self.config_path = tmp / "edge.toml"
        self.config_path.write_text(config)
        self.log_path = tmp / "requests.jsonl"
        self.stats_path = tmp / "stats.json"
        self.out_path = tmp / "harness.out"
        args = [sys.executable, str(HARNESS), str(self.config_path), "--log", str(self.log_path),
                "--stats", str(self.stats_path)]
        for t in tls:
            args += ["--tls", t]
        if cert is not None:
            args += ["--cert", str(cert), "--key", str(key)]
        if acme_dir is not None:
            args += ["--acme-dir", str(acme_dir)]
        if trusted_proxy_header:
            args.append("--trusted-proxy-header")
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            for port in wait:
                wait_port("127.0.0.1", port, 15)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stats(self) -> dict:  # type: ignore[type-arg]
        with contextlib.suppress(FileNotFoundError):
            self.stats_path.unlink()
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.stats_path.exists():
                return json.loads(self.stats_path.read_text())  # type: ignore[no-any-return]
            time.sleep(0.02)
        raise TimeoutError("no stats from the harness")

    def counter(self, name: str) -> int:
        return int(self.stats()["counters"].get(name, 0))

    def records(self) -> list[dict]:  # type: ignore[type-arg]
        return [json.loads(line) for line in whole_lines(self.log_path)]

    def wait_records(self, n: int, timeout: float = 5.0) -> list[dict]:  # type: ignore[type-arg]
        deadline = time.monotonic() + timeout
        recs = self.records()
        while len(recs) < n and time.monotonic() < deadline:
            time.sleep(0.02)
            recs = self.records()
        return recs

    def fds(self) -> int:
        return open_fds(self.pid)

    def rss_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in KiB."""
        rss = hwm = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
        return rss, hwm

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


# nginx reports what reached it, in its body and in an access log of JSON lines.
REPORT = ('{"uri":"$request_uri","method":"$request_method","host":"$host","xff":"$http_x_forwarded_for",'
          '"xfp":"$http_x_forwarded_proto","xfh":"$http_x_forwarded_host","xrip":"$http_x_real_ip",'
          '"fwd":"$http_forwarded","conn":"$connection","reqs":"$connection_requests","te":"$http_transfer_encoding",'
          '"cl":"$http_content_length","expect":"$http_expect","hop":"$http_x_hop","upgrade":"$http_upgrade",'
          '"proto":"$server_protocol","scheme":"$scheme","body_file":"$request_body_file"}')


@dataclass
class NginxUpstream:
    prefix: Path
    port: int
    tls_port: int | None = None
    public: Path | None = None  # world-readable files nginx serves

    def log(self) -> list[dict]:  # type: ignore[type-arg]
        return [json.loads(line) for line in whole_lines(self.prefix / "logs" / "report.log")]

    def quiet_log(self, quiet: float = 0.1, timeout: float = 5.0) -> list[dict]:  # type: ignore[type-arg]
        """The log once it has not grown for `quiet` seconds: nginx writes a request's line after
        its response is sent, so an earlier test's last line may still be on its way."""
        deadline = time.monotonic() + timeout
        recs = self.log()
        still_since = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - still_since < quiet:
            time.sleep(0.02)
            now = self.log()
            if len(now) != len(recs):
                recs, still_since = now, time.monotonic()
        return recs

    def wait_log(self, n: int, timeout: float = 5.0) -> list[dict]:  # type: ignore[type-arg]
        deadline = time.monotonic() + timeout
        recs = self.log()
        while len(recs) < n and time.monotonic() < deadline:
            time.sleep(0.02)
            recs = self.log()
        return recs


def pin_of(cert_pem: bytes) -> str:
    """upstream_tls.pin of a PEM certificate: the SHA-256 of its DER bytes, in hex."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
    return hashlib.sha256(der).hexdigest()


def nginx_server_block(port: int, public: Path, *, ssl_cert: Path | None = None, ssl_key: Path | None = None,
                       body_dir: Path | None = None) -> str:
    listen = f"listen 127.0.0.1:{port}{' ssl' if ssl_cert else ''};"
    tls = f"ssl_certificate {ssl_cert}; ssl_certificate_key {ssl_key};" if ssl_cert else ""
    return f"""
    server {{
        {listen}
        {tls}
        server_name _;
        keepalive_requests 10000;
        client_max_body_size 4g;
        access_log logs/report.log report;
        location / {{ default_type application/json; return 200 '{REPORT}\\n'; }}
        location /big {{ alias {public}/big.bin; }}
        location /status/ {{ return 200 "status\\n"; }}
        location = /401 {{ return 401 "no\\n"; }}
        location = /204 {{ return 204; }}
        {f"client_body_temp_path {body_dir};" if body_dir else ""}
        location /upload {{
            client_body_in_file_only {'on' if body_dir else 'off'};
            client_body_buffer_size 1m;
            proxy_pass http://127.0.0.1:{port}/report-after-body;
            proxy_set_header X-Body-File $request_body_file;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
        }}
        location /report-after-body {{ default_type text/plain; return 200 '$http_x_body_file\\n'; }}
    }}
"""


@contextlib.contextmanager
def nginx_upstream(tmp: Path, *, tls: tuple[Path, Path] | None = None, store_bodies: bool = False,
                   big_bytes: int = 0) -> Iterator[NginxUpstream]:
    port = free_port()
    # What nginx's unprivileged worker reads (the big file) and writes (stored request bodies, which
    # the test hashes) lives outside pytest's private tmp directories, which it cannot enter.
    public = Path(tempfile.mkdtemp(prefix="edgeward-nginx-"))
    public.chmod(0o755)
    body_dir = public / "bodies" if store_bodies else None
    if body_dir is not None:
        body_dir.mkdir()
        body_dir.chmod(0o777)
    if big_bytes:
        with open(public / "big.bin", "wb") as f:
            block = os.urandom(1 << 16)
            for _ in range(big_bytes // len(block)):
                f.write(block)
        (public / "big.bin").chmod(0o644)
    servers = nginx_server_block(port, public, body_dir=body_dir)
    tls_port = None
    if tls is not None:
        tls_port = free_port()
        servers += nginx_server_block(tls_port, public, ssl_cert=tls[0], ssl_key=tls[1], body_dir=body_dir)
    body = f"log_format report escape=json '{REPORT}';\n" + servers
    ports = [port] + ([tls_port] if tls_port else [])
    try:
        with nginx(tmp, body, ports) as pfx:
            yield NginxUpstream(pfx, port, tls_port, public)
    finally:
        shutil.rmtree(public, ignore_errors=True)


# --- a strict raw client ---------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    interim: list[int] = field(default_factory=list)
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.decode().lower() == name.lower():
                return v.decode("latin-1")
        return None

    def json(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.body)  # type: ignore[no-any-return]


class _Reader:
    def __init__(self, head_request: bool) -> None:
        self.head_request = head_request
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[Response] = []
        self.cur: Response | None = None
        self.interim: list[int] = []

    def on_message_begin(self) -> None:
        self.cur = Response(0, [], b"")
        self.parts: list[bytes] = []

    def on_header(self, n: bytes, v: bytes) -> None:
        assert self.cur is not None
        self.cur.headers.append((n, v))

    def on_headers_complete(self) -> None:
        assert self.cur is not None
        self.cur.status = self.parser.get_status_code()
        self.cur.keep_alive = self.parser.should_keep_alive()
        if self.head_request and self.cur.status >= 200:
            self.done.append(self.cur)
            raise StopIteration  # a HEAD response has no body; the caller stops here

    def on_body(self, b: bytes) -> None:
        self.parts.append(b)  # joined once at the end: large bodies stay linear

    def on_message_complete(self) -> None:
        assert self.cur is not None
        self.cur.body = b"".join(self.parts)
        if self.cur.status < 200:
            self.interim.append(self.cur.status)
            return
        self.cur.interim = self.interim
        self.done.append(self.cur)


_readers: weakref.WeakKeyDictionary[socket.socket, _Reader] = weakref.WeakKeyDictionary()


def read_response(s: socket.socket, *, head_request: bool = False, timeout: float = 10.0) -> Response | None:
    """The next response on `s` (None if the connection closed first). Responses to pipelined
    requests that arrive in one read are kept for the next call; after a HEAD response whatever
    else came in the same read is lost (send the next request after it)."""
    s.settimeout(timeout)
    r = _readers.get(s)
    if r is None or head_request:
        r = _readers[s] = _Reader(head_request)
    while not r.done:
        data = s.recv(65536)
        if not data:
            cur = r.cur
            if cur is not None and cur.status >= 200 and not cur.keep_alive:
                cur.body = b"".join(r.parts)
                return cur  # a body delimited by the close
            return None
        try:
            r.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            del _readers[s]
            break
    return r.done.pop(0) if r.done else None


def request(port: int, raw: bytes, *, head_request: bool = False, tls_host: str | None = None,
            ca: Path | None = None, timeout: float = 10.0) -> Response | None:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls_host is not None:
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        s = ctx.wrap_socket(s, server_hostname=tls_host)
    with s:
        s.sendall(raw)
        return read_response(s, head_request=head_request, timeout=timeout)


def get(port: int, path: str = "/", host: str = "a.test", headers: str = "", **kw: object) -> Response:
    r = request(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode(), **kw)  # type: ignore[arg-type]
    assert r is not None, "connection closed without a response"
    return r


def closed_by_peer(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def wss_exchange(port: int, uri: str, ca: ssl.SSLContext, server_hostname: str, messages: list[str | bytes], *,
                 idle_after_first: float = 0.0) -> list[str | bytes]:
    """Send each message over a wss:// websocket to 127.0.0.1:`port` and return the replies.

    With websockets' asyncio client, on one thread: its sync client reads the socket on a thread
    of its own while the caller's thread writes, and Python's SSL sockets are not safe for that
    (OpenSSL forbids concurrent SSL_read/SSL_write on one session): now and then the upgrade
    request never left, and the edge rightly timed the silent connection out
    (python-socketio#1568 is the same race)."""
    from websockets.asyncio.client import connect

    async def run() -> list[str | bytes]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        async with connect(uri, ssl=ca, sock=sock, server_hostname=server_hostname, ping_interval=None,
                           open_timeout=10, max_size=None) as c:
            replies: list[str | bytes] = []
            for i, m in enumerate(messages):
                await c.send(m)
                replies.append(await asyncio.wait_for(c.recv(), 10))
                if i == 0 and idle_after_first:
                    await asyncio.sleep(idle_after_first)
            return replies

    return asyncio.run(run())
