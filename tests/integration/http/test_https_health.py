"""Active health checks of https:// pool servers speak TLS with the service's upstream_tls
(CA and name, pin, or verify = false), against a real nginx serving a self-signed certificate:
a plain GET to its TLS port would mark every such server down."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import trustme

from http_peers import get, nginx_upstream, pin_of
from support import EdgeProcess, free_port, require, wait_until, write_cert


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeProcess]:
    require("nginx")
    tmp = tmp_path_factory.mktemp("https-health")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    up = write_cert(ca, tmp, "up", "upstream.test")
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp / "other.pem"))
    pin = pin_of(up.cert_chain_pems[0].bytes())
    with nginx_upstream(tmp, tls=(tmp / "up.pem", tmp / "up.key")) as ngx:
        port, admin = free_port(), free_port()
        server = f"https://127.0.0.1:{ngx.tls_port}"
        health = 'health = { http = "/status/", interval = "200ms", timeout = "1s", fall = 1 }'
        checks = {
            "ca": f'{{ ca = "{tmp / "ca.pem"}", server_name = "upstream.test" }}',
            "pinned": f'{{ pin = "{pin}" }}',
            "insecure": "{ verify = false }",
            "wrongpin": f'{{ pin = "{"00" * 32}" }}',
            "untrusted": f'{{ ca = "{tmp / "other.pem"}", server_name = "upstream.test" }}',
            "wrongname": f'{{ ca = "{tmp / "ca.pem"}" }}',
        }
        config = '[http]\nredirect = "off"\n'
        for name, tls in checks.items():
            config += f"""
[pools.{name}]
servers = ["{server}"]
{health}

[services.{name}]
listen = ["127.0.0.1:{port}"]
names = ["{name}.test"]
to = "{name}"
upstream_tls = {tls}
"""
        e = EdgeProcess(tmp, config, admin_port=admin, wait=[("127.0.0.1", port)])
        time.sleep(0.5)  # a few check intervals before the first look
        e.port = port  # type: ignore[attr-defined]
        try:
            yield e
        finally:
            e.stop()


def _healthy(edge: EdgeProcess, pool: str) -> bool:
    servers = edge.status()["pools"][pool]["servers"]  # type: ignore[index]
    return bool(servers[0]["healthy"])


@pytest.mark.parametrize("pool", ["ca", "pinned", "insecure"])
def test_a_server_its_requests_trust_stays_up_and_serves(edge: EdgeProcess, pool: str) -> None:
    # Several check intervals: a check speaking plain HTTP to the TLS port fails each time (fall = 1).
    for _ in range(5):
        assert _healthy(edge, pool)
        assert get(edge.port, "/", host=f"{pool}.test").status == 200  # type: ignore[attr-defined]
        time.sleep(0.2)


@pytest.mark.parametrize("pool", ["wrongpin", "untrusted", "wrongname"])
def test_a_certificate_its_requests_refuse_marks_the_server_down(edge: EdgeProcess, pool: str) -> None:
    assert wait_until(lambda: not _healthy(edge, pool), timeout=5)
