"""The admin API's client: what `edgeward status`, `reload`, `ban`... use to reach a running edge."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

DEFAULT_ADMIN = "127.0.0.1:9901"


class AdminUnreachable(Exception):
    """The running edge's admin API could not be reached (not running, wrong address, ...)."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def admin_request(method: str, path: str, admin: str | None, token: str | None, body: Any = None,
                  timeout: float = 10.0) -> tuple[int, Any]:
    """One request to the admin API at `admin` ("unix:/path" or host:port); (status, JSON or text)."""
    admin = admin or DEFAULT_ADMIN
    conn: http.client.HTTPConnection
    if admin.startswith("unix:"):
        conn = _UnixHTTPConnection(admin[5:], timeout)
    else:
        host, _, port = admin.rpartition(":")
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except OSError as e:
        raise AdminUnreachable(f"cannot reach the admin API at {admin}: {e}") from None
    finally:
        conn.close()
    ctype = resp.getheader("Content-Type", "")
    data = json.loads(raw) if ctype.startswith("application/json") and raw else raw.decode()
    return resp.status, data
