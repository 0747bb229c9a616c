"""Launchers for real Debian peers (haproxy, nginx) with their own configs and data dirs."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bench.procs import stop_process

from support import require, wait_port


@contextlib.contextmanager
def haproxy(tmp: Path, body: str, ports: list[int]) -> Iterator[Path]:
    """Run haproxy in the foreground; its log (log-format lines) goes to the returned file."""
    exe = require("haproxy")
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(f"""global
    log stdout format raw local0
    maxconn 2000
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
{body}
""")
    log = tmp / "haproxy.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([exe, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
        try:
            for port in ports:
                wait_port("127.0.0.1", port, 10)
            yield log
        finally:
            stop_process(p)


@contextlib.contextmanager
def nginx(tmp: Path, http_body: str, ports: list[int], stream_body: str = "") -> Iterator[Path]:
    """Run nginx (master + 1 worker) with a private prefix; returns the prefix dir (logs inside)."""
    exe = require("nginx")
    prefix = tmp / "nginx"
    for d in ("logs", "tmp"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    stream = ""
    if stream_body:
        mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
        stream = f"stream {{ {stream_body} }}"
        load = f"load_module {mod};" if Path(mod).exists() else ""
    else:
        load = ""
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{load}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    {http_body}
}}
{stream}
""")
    p = subprocess.Popen([exe, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs/error.log")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for port in ports:
            wait_port("127.0.0.1", port, 10)
        yield prefix
    finally:
        stop_process(p)  # nginx master stops its workers on SIGTERM


def wait_for_text(path: Path, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    return content
