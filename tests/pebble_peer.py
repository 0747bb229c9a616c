"""Debian's pebble (a test ACME CA) with pebble-challtestsrv as its DNS, on loopback high ports.

pebble validates a name by resolving it through `-dnsserver`; challtestsrv answers A queries
only for the names a test adds (`add_a`), so any other name does not resolve and its
validation fails. pebble's own HTTPS certificate comes from a trustme CA (`ca_pem`).
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme
from bench.procs import stop_process

from support import free_port, require, wait_port


@dataclass
class Pebble:
    directory: str
    ca_file: Path  # trusts pebble's HTTPS (directory and management API)
    http_port: int  # where pebble's VA sends HTTP-01 requests
    tls_port: int  # where pebble's VA connects for TLS-ALPN-01
    management: str
    dns_management: str
    log: Path

    def _ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def root_pem(self) -> bytes:
        """The root that signs pebble's issuing intermediate (new at every pebble start)."""
        with urllib.request.urlopen(f"{self.management}/roots/0", context=self._ctx(), timeout=10) as r:
            data: bytes = r.read()
            return data

    def add_a(self, host: str, address: str = "127.0.0.1") -> None:
        body = json.dumps({"host": host.rstrip(".") + ".", "addresses": [address]}).encode()
        req = urllib.request.Request(f"{self.dns_management}/add-a", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200


@contextlib.contextmanager
def pebble(tmp: Path, *, validity: int = 3600, resolve: tuple[str, ...] = (), port: int | None = None) -> Iterator[Pebble]:
    """`port`: the directory's port (the same URL again plays a CA that lost its state)."""
    exe = require("pebble")
    challtestsrv = require("pebble-challtestsrv")
    tmp.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_pem, key_pem, ca_file = tmp / "pebble-cert.pem", tmp / "pebble-key.pem", tmp / "pebble-ca.pem"
    server_cert.private_key_pem.write_to_path(str(key_pem))
    server_cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    ca.cert_pem.write_to_path(str(ca_file))
    listen, mgmt, http_port, tls_port = port or free_port(), free_port(), free_port(), free_port()
    dns_port, dns_mgmt = free_port(), free_port()
    config = tmp / "pebble.json"
    config.write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{listen}",
        "managementListenAddress": f"127.0.0.1:{mgmt}",
        "certificate": str(cert_pem),
        "privateKey": str(key_pem),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
        "certificateValidityPeriod": validity,
    }}))
    log = tmp / "pebble.log"
    # No sleeps before validation, no random nonce rejections, and every order validated
    # afresh (no reuse of earlier authorizations), so the tests see each challenge.
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
    with open(log, "wb") as out, open(tmp / "challtestsrv.log", "wb") as dns_out:
        dns = subprocess.Popen(
            [challtestsrv, "-dns01", f"127.0.0.1:{dns_port}", "-management", f"127.0.0.1:{dns_mgmt}",
             "-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv4", "", "-defaultIPv6", ""],
            stdout=dns_out, stderr=subprocess.STDOUT)
        ca_proc = None
        try:
            wait_port("127.0.0.1", dns_mgmt, 10)
            ca_proc = subprocess.Popen([exe, "-config", str(config), "-dnsserver", f"127.0.0.1:{dns_port}"],
                                       stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(tmp))
            wait_port("127.0.0.1", listen, 15)
            wait_port("127.0.0.1", mgmt, 15)
            peer = Pebble(f"https://127.0.0.1:{listen}/dir", ca_file, http_port, tls_port,
                          f"https://127.0.0.1:{mgmt}", f"http://127.0.0.1:{dns_mgmt}", log)
            for host in resolve:
                peer.add_a(host)
            yield peer
        finally:
            for p in (ca_proc, dns):
                if p is not None:
                    stop_process(p)
