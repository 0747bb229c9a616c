"""The bouncer over TLS to Debian's crowdsec LAPI serving HTTPS (a trustme CA): with the API key
and ca_cert_path; with a client certificate instead of a key (the LAPI's bouncers_allowed_ou);
and a LAPI certificate the edge does not trust is a counted "tls" error, never a crash."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from crowdsec_peer import Lapi
from support import EdgeProcess, ThreadServer, echo_handler, free_port, served, wait_until

pytestmark = pytest.mark.peer("crowdsec")

POLL = 0.3


def edge_config(port: int, up: int, url: str, auth: str) -> str:
    return f"""
[services.app]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up}"

[guard.crowdsec]
lapi_url = "{url}"
update_frequency = "{int(POLL * 1000)}ms"
max_backoff = "1s"
timeout = "2s"
{auth}
"""


def test_tls_with_key_with_client_certificate_and_untrusted(tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = tmp_path / "pem"
    pem.mkdir()
    cert, key, ca_file = pem / "lapi.pem", pem / "lapi.key", pem / "ca.pem"
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.cert_chain_pems[0].write_to_path(str(cert))
    server_cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("edge-mtls", common_name="edge-mtls", organization_unit_name="bouncer-ou")
    ccert, ckey = pem / "bouncer.pem", pem / "bouncer.key"
    client.cert_chain_pems[0].write_to_path(str(ccert))
    client.private_key_pem.write_to_path(str(ckey))

    up = ThreadServer(echo_handler())
    server = Lapi(tmp_path / "lapi", tls=(cert, key, ca_file))
    server.start()
    edges: list[EdgeProcess] = []
    try:
        api_key = server.add_bouncer("edge-key")
        server.cscli("decisions", "add", "--ip", "127.0.0.40", "--duration", "1h")
        ports = [free_port() for _ in range(3)]
        auths = [
            f'api_key = "{api_key}"\nca_cert_path = "{ca_file}"',
            f'cert_path = "{ccert}"\nkey_path = "{ckey}"\nca_cert_path = "{ca_file}"',
            f'api_key = "{api_key}"',  # the system's CAs: trustme's is not one of them
        ]
        for i, (port, auth) in enumerate(zip(ports, auths, strict=True)):
            d = tmp_path / f"edge{i}"
            d.mkdir()
            edges.append(EdgeProcess(d, edge_config(port, up.port, server.url, auth), wait=[("127.0.0.1", port)]))
        key_edge, cert_edge, untrusting = edges
        for e, port in ((key_edge, ports[0]), (cert_edge, ports[1])):
            assert wait_until(lambda e=e, port=port: not served("127.0.0.40", port), 10), e.log()
            assert e.status()["guard"]["crowdsec"]["connected"]  # type: ignore[index]
        server.cscli("decisions", "add", "--ip", "127.0.0.41", "--duration", "1h")
        assert wait_until(lambda: not served("127.0.0.41", ports[1]), 10 * POLL + 5), cert_edge.log()
        # The LAPI registered the certificate's bouncer by itself.
        assert "edge-mtls" in server.cscli("bouncers", "list", "-o", "raw")

        def tls_errors() -> int:
            return int(untrusting.status()["guard"]["crowdsec"]["errors_by_kind"].get("tls", 0))  # type: ignore[index]

        assert wait_until(lambda: tls_errors() >= 2, 10), untrusting.log()
        assert served("127.0.0.40", ports[2])  # no decisions, but serving
        assert "TLS with the LAPI failed" in untrusting.log()
        assert untrusting.proc.poll() is None
    finally:
        for e in edges:
            e.stop()
        server.stop()
        up.close()
