"""Debian's redis-server on a loopback high port, with its own directory, stopped by PID.

No persistence (``save ""``, no AOF): a killed and restarted server comes back empty, the
hardest case for the nodes sharing bans through it. Optional password (requirepass) and
TLS (``--tls-port`` with a trustme CA; clients need no certificate unless asked).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import trustme
from bench.procs import stop_process

from support import free_port, require


class RedisServer:
    def __init__(self, tmp: Path, *, port: int | None = None, password: str | None = None,
                 tls: bool = False, client_certs: bool = False, unix: bool = False) -> None:
        self.exe = require("redis-server")
        self.dir = tmp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.unix = self.dir / "redis.sock" if unix else None
        self.ca: trustme.CA | None = None
        self.ca_file = self.dir / "ca.pem"
        self.client_cert = self.dir / "client.pem"
        self.client_key = self.dir / "client-key.pem"
        self.client_certs = client_certs
        if tls:
            self.ca = trustme.CA()
            self.ca.cert_pem.write_to_path(str(self.ca_file))
            server = self.ca.issue_cert("127.0.0.1", "localhost")
            server.private_key_pem.write_to_path(str(self.dir / "server-key.pem"))
            server.cert_chain_pems[0].write_to_path(str(self.dir / "server.pem"))
            client = self.ca.issue_cert("edgeward-test-client")
            client.private_key_pem.write_to_path(str(self.client_key))
            client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "redis.log"
        self.start()

    @property
    def url(self) -> str:
        if self.unix is not None:
            return f"unix://{self.unix}?db=0"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        args = [self.exe, "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--logfile", str(self.log_path), "--protected-mode", "no"]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.dir / "server.pem"),
                     "--tls-key-file", str(self.dir / "server-key.pem"),
                     "--tls-ca-cert-file", str(self.ca_file),
                     "--tls-auth-clients", "yes" if self.client_certs else "no"]
        elif self.unix is not None:
            args += ["--port", "0", "--unixsocket", str(self.unix), "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError):
                if self.unix is not None:
                    with socket.socket(socket.AF_UNIX) as u:
                        u.connect(str(self.unix))
                else:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            time.sleep(0.02)
        raise TimeoutError(f"redis-server did not open port {self.port}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save; with no persistence the data is gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def cli(self, *args: str) -> str:
        """redis-cli against this server (for looking at what the nodes wrote)."""
        argv = [require("redis-cli"), "--no-auth-warning",
                *(["-s", str(self.unix)] if self.unix is not None else ["-h", "127.0.0.1", "-p", str(self.port)])]
        if self.password is not None:
            argv += ["-a", self.password]
        if self.tls:
            argv += ["--tls", "--cacert", str(self.ca_file)]
            if self.client_certs:
                argv += ["--cert", str(self.client_cert), "--key", str(self.client_key)]
        return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=10, check=True).stdout


@contextlib.contextmanager
def redis_server(tmp: Path, **kw: object) -> Iterator[RedisServer]:
    r = RedisServer(tmp, **kw)  # type: ignore[arg-type]
    try:
        yield r
    finally:
        r.stop()
