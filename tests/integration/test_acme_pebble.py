"""ACME against a real CA: Debian's pebble, with pebble-challtestsrv as its DNS.

The test plays the edge's ports: an HTTP responder on pebble's httpPort answering
/.well-known/acme-challenge/ from `AcmeManager.http01_response`, and a TLS server on pebble's
tlsPort wrapping with `CertStore.server_context()` (TLS-ALPN-01 and the real certificate).
Everything runs on one event loop (uvloop, as in the edge) while the `acme` calls run on the
manager's worker threads: validation only succeeds if the loop keeps serving meanwhile.
Served certificates are then checked by real TLS clients against pebble's root.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from edgeward.config.loader import validate
from edgeward.config.schema import AcmeSettings
from edgeward.tls.acme import AcmeManager
from edgeward.tls.certstore import CertStore
from pebble_peer import Pebble, pebble
from support import free_port, require

pytestmark = pytest.mark.peer("pebble")


class EdgePorts:
    """Port 80 (HTTP-01 answers) and 443 (TLS through the store) as the edge will serve them."""

    def __init__(self, manager: AcmeManager, store: CertStore) -> None:
        self.manager, self.store = manager, store
        self.http_requests: list[tuple[str, str, int]] = []  # (Host, path, status)
        self.tls_alpn: list[str | None] = []
        self.servers: list[asyncio.Server] = []

    async def start(self, http_port: int, tls_port: int) -> None:
        self.servers.append(await asyncio.start_server(self._http, "127.0.0.1", http_port))
        self.servers.append(await asyncio.start_server(self._tls, "127.0.0.1", tls_port,
                                                       ssl=self.store.server_context(),
                                                       ssl_handshake_timeout=10))

    async def close(self) -> None:
        for s in self.servers:
            s.close()
            await s.wait_closed()

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            _method, path, _version = lines[0].split(" ", 2)
            host = next((v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "host"), "")
            prefix = "/.well-known/acme-challenge/"
            answer = self.manager.http01_response(path[len(prefix):]) if path.startswith(prefix) else None
            status, body = (200, answer.encode()) if answer is not None else (404, b"not found\n")
            self.http_requests.append((host, path, status))
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()

    async def _tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        alpn = obj.selected_alpn_protocol() if obj else None
        self.tls_alpn.append(alpn)
        try:
            if alpn != "acme-tls/1":  # RFC 8737: a validation connection carries no data
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def settings(peer: Pebble, **kw: object) -> AcmeSettings:
    base: dict[str, object] = {"directory": peer.directory, "ca_file": str(peer.ca_file), "email": "ops@example.org",
                               "retry_min": "1s", "retry_max": "8s", "order_timeout": "30s"}
    base.update(kw)
    return validate(AcmeSettings, base)


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def fetch_leaf(port: int, name: str, root_pem: bytes, alpn: list[str] | None = None) -> tuple[str, str | None]:
    """A verifying Python TLS client: (SHA-256 of the leaf, negotiated ALPN)."""
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest(), tls.selected_alpn_protocol()


def openssl_verifies(port: int, name: str, root: Path) -> str:
    exe = require("openssl")
    out = subprocess.run([exe, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name,
                          "-verify_hostname", name, "-CAfile", str(root), "-verify_return_error",
                          "-alpn", "http/1.1"], input=b"", capture_output=True, timeout=20)
    text = out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
    assert out.returncode == 0, text
    assert "Verify return code: 0 (ok)" in text, text
    return text


def run(tmp: Path, peer_kw: dict[str, object], body: Callable[[Pebble, Path], Awaitable[None]]) -> None:
    with pebble(tmp / "pebble", **peer_kw) as peer:  # type: ignore[arg-type]
        try:
            uvloop.run(asyncio.wait_for(body(peer, tmp), 120))
        except BaseException:
            print(peer.log.read_text(errors="replace")[-4000:])
            raise


async def with_edge(peer: Pebble, state: Path, names: list[str], **kw: object) -> tuple[AcmeManager, CertStore, EdgePorts]:
    store = CertStore()
    manager = AcmeManager(settings(peer, **kw), state, store)
    manager.manage(names)
    ports = EdgePorts(manager, store)
    await ports.start(peer.http_port, peer.tls_port)
    await manager.start()
    return manager, store, ports


def test_http01_issuance_verified_by_python_and_openssl_then_restart_loads_without_order(tmp_path: Path) -> None:
    async def body(peer: Pebble, tmp: Path) -> None:
        peer.add_a("web.test")
        state = tmp / "state"
        manager, store, ports = await with_edge(peer, state, ["web.test"], challenges=["http-01"])
        try:
            assert manager.status()["web.test"]["state"] in ("pending", "ordering")
            await wait_for(lambda: manager.status()["web.test"]["state"] == "valid", 60, "a certificate")
            st = manager.status()["web.test"]
            assert st["challenge"] == "http-01" and st["last_error"] is None and st["failures"] == 0
            assert any(p.startswith("/.well-known/acme-challenge/") and code == 200 and host.startswith("web.test")
                       for host, p, code in ports.http_requests), ports.http_requests
            cert = store.lookup("web.test")
            assert cert is not None and cert.names == ("web.test",) and cert.key_type == "ECDSA P-256"
            assert "Pebble" in cert.issuer
            root = peer.root_pem()
            (tmp / "root.pem").write_bytes(root)
            fp, alpn = await asyncio.to_thread(fetch_leaf, peer.tls_port, "web.test", root, ["http/1.1"])
            assert (fp, alpn) == (cert.fingerprint, "http/1.1")
            await asyncio.to_thread(openssl_verifies, peer.tls_port, "web.test", tmp / "root.pem")
            # A name the store does not hold is refused (no default configured). asyncio's and
            # uvloop's SSL transports close without flushing the unrecognized_name alert the store
            # asked for (the unit tests see the alert over BIOs and SSLSocket).
            with pytest.raises(ssl.SSLError, match=r"UNRECOGNIZED_NAME|UNEXPECTED_EOF"):
                await asyncio.to_thread(fetch_leaf, peer.tls_port, "other.test", root)
            assert store.counters["handshake_unrecognized_name"] == 1
        finally:
            await manager.close()
            await ports.close()
        # The state dir: private account and certificate keys, the registration, the chain.
        acme_dir = state / "acme"
        for key in [*acme_dir.glob("accounts/*/account.key"), acme_dir / "certs/web.test/key.pem"]:
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert stat.S_IMODE(acme_dir.stat().st_mode) == 0o700
        assert len(list(acme_dir.glob("accounts/*/account.json"))) == 1
        # Restart: the certificate comes from the state dir, no new order is made.
        before = len(ports.http_requests)
        manager2, store2, ports2 = await with_edge(peer, state, ["web.test"], challenges=["http-01"])
        try:
            loaded = store2.lookup("web.test")
            assert loaded is not None and loaded.fingerprint == cert.fingerprint  # before start() even ran
            await asyncio.sleep(2.5)
            st = manager2.status()["web.test"]
            assert st["state"] == "valid" and st["last_issued"] is None, st
            assert len(ports.http_requests) == before and ports2.http_requests == []
            fp, _ = await asyncio.to_thread(fetch_leaf, peer.tls_port, "web.test", root)
            assert fp == cert.fingerprint
        finally:
            await manager2.close()
            await ports2.close()

    run(tmp_path, {}, body)


def test_a_reset_ca_forgetting_the_account_gets_the_same_key_registered_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "edgeward.acme")
    state = tmp_path / "state"

    async def first(peer: Pebble, tmp: Path) -> None:
        peer.add_a("one.test")
        manager, _store, ports = await with_edge(peer, state, ["one.test"])
        try:
            await wait_for(lambda: manager.status()["one.test"]["state"] == "valid", 60, "one.test")
        finally:
            await manager.close()
            await ports.close()

    async def second(peer: Pebble, tmp: Path) -> None:  # a new pebble: it knows no account
        peer.add_a("two.test")
        manager, _store, ports = await with_edge(peer, state, ["one.test", "two.test"])
        try:
            assert manager.status()["one.test"]["state"] == "valid"  # from the state dir
            await wait_for(lambda: manager.status()["two.test"]["state"] == "valid", 60, "two.test")
            assert manager.status()["two.test"]["failures"] == 0
            assert manager.status()["one.test"]["last_issued"] is None
        finally:
            await manager.close()
            await ports.close()

    keys = lambda: sorted(p.read_bytes() for p in (state / "acme").glob("accounts/*/account.key"))  # noqa: E731
    port = free_port()
    run(tmp_path / "a", {"port": port}, first)
    key_before = keys()
    run(tmp_path / "b", {"port": port}, second)
    assert keys() == key_before and len(key_before) == 1
    assert "does not know the account any more; registering again" in caplog.text
    assert caplog.text.count("account registered at") == 2


def test_tls_alpn01_issuance_through_the_store_while_other_clients_are_served(tmp_path: Path) -> None:
    async def body(peer: Pebble, tmp: Path) -> None:
        peer.add_a("chat.test")
        manager, store, ports = await with_edge(peer, tmp / "state", ["chat.test"], challenges=["tls-alpn-01"],
                                                key_type="rsa2048")
        try:
            await wait_for(lambda: manager.status()["chat.test"]["state"] == "valid", 60, "a certificate")
            assert manager.status()["chat.test"]["challenge"] == "tls-alpn-01"
            assert "acme-tls/1" in ports.tls_alpn  # pebble's validation handshake negotiated it
            assert store.counters["handshake_acme_tls_alpn"] >= 1
            assert ports.http_requests == []
            assert store.pending_challenges() == []
            root = peer.root_pem()
            (tmp / "root.pem").write_bytes(root)
            cert = store.lookup("chat.test")
            assert cert is not None and cert.key_type == "RSA 2048"
            fp, alpn = await asyncio.to_thread(fetch_leaf, peer.tls_port, "chat.test", root, ["h2", "http/1.1"])
            assert (fp, alpn) == (cert.fingerprint, "http/1.1")
            await asyncio.to_thread(openssl_verifies, peer.tls_port, "chat.test", tmp / "root.pem")
        finally:
            await manager.close()
            await ports.close()

    run(tmp_path, {}, body)


def test_short_lived_certificates_are_renewed_and_new_handshakes_get_the_new_one(tmp_path: Path) -> None:
    async def body(peer: Pebble, tmp: Path) -> None:
        peer.add_a("short.test")
        # pebble issues 12 s certificates; the default renew_fraction (1/3) renews 4 s before expiry.
        manager, store, ports = await with_edge(peer, tmp / "state", ["short.test"])
        try:
            await wait_for(lambda: store.lookup("short.test") is not None, 60, "a first certificate")
            first = store.lookup("short.test")
            assert first is not None
            assert first.lifetime() <= dt.timedelta(seconds=13)
            root = peer.root_pem()
            established = await asyncio.to_thread(_open_tls, peer.tls_port, "short.test", root)
            await wait_for(lambda: (c := store.lookup("short.test")) is not None and c.fingerprint != first.fingerprint,
                           40, "a renewed certificate")
            second = store.lookup("short.test")
            assert second is not None and second.not_after > first.not_after
            fp, _ = await asyncio.to_thread(fetch_leaf, peer.tls_port, "short.test", root)
            assert fp == second.fingerprint
            # The connection made before the renewal still has the old certificate and works.
            der = established.getpeercert(binary_form=True)
            assert der is not None and hashlib.sha256(der).hexdigest() == first.fingerprint
            assert await asyncio.to_thread(_read_all, established) == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
            st = manager.status()["short.test"]
            assert st["state"] in ("valid", "renewing") and st["last_error"] is None
        finally:
            await manager.close()
            await ports.close()

    run(tmp_path, {"validity": 12}, body)


def _open_tls(port: int, name: str, root_pem: bytes) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=name)


def _read_all(s: ssl.SSLSocket) -> bytes:
    data = b""
    with s:
        while chunk := s.recv(4096):
            data += chunk
    return data


def test_renew_before_longer_than_the_lifetime_renews_at_most_every_retry_min(tmp_path: Path) -> None:
    async def body(peer: Pebble, tmp: Path) -> None:
        peer.add_a("eager.test")
        manager, store, ports = await with_edge(peer, tmp / "state", ["eager.test"], renew_before="2h",
                                                retry_min="2s")
        try:
            seen: list[str] = []

            def renewed_twice() -> bool:
                c = store.lookup("eager.test")
                if c is not None and (not seen or seen[-1] != c.fingerprint):
                    seen.append(c.fingerprint)
                return len(seen) >= 3

            started = time.monotonic()
            await wait_for(renewed_twice, 60, "two renewals")
            # Three issuances need at least two retry_min pauses between them.
            assert time.monotonic() - started >= 2 * 2.0 - 0.5
            assert manager.status()["eager.test"]["failures"] == 0
        finally:
            await manager.close()
            await ports.close()

    run(tmp_path, {}, body)


def test_failing_name_backs_off_and_alternates_challenges_while_another_gets_its_certificate(tmp_path: Path) -> None:
    async def body(peer: Pebble, tmp: Path) -> None:
        peer.add_a("good.test")  # bad.test is not in the test DNS: its validation fails
        manager, store, ports = await with_edge(peer, tmp / "state", ["bad.test", "good.test", "*.wild.test"],
                                                retry_min="1s", retry_max="4s", concurrency=1)
        try:
            await wait_for(lambda: manager.status()["good.test"]["state"] == "valid", 60, "good.test's certificate")
            attempts: list[tuple[int, str | None, float]] = []

            def note() -> bool:
                st = manager.status()["bad.test"]
                n = int(st["failures"])  # type: ignore[call-overload]
                if n and (not attempts or attempts[-1][0] != n):
                    attempts.append((n, st["challenge"], time.monotonic()))  # type: ignore[arg-type]
                return n >= 4

            await wait_for(note, 60, "four failed attempts for bad.test")
            st = manager.status()["bad.test"]
            assert st["state"] in ("retrying", "ordering")
            assert store.lookup("bad.test") is None
            assert "bad.test" in str(st["last_error"]) or "DNS" in str(st["last_error"]) \
                or "NXDOMAIN" in str(st["last_error"]), st["last_error"]
            # Both challenge types were tried.
            assert {c for _, c, _ in attempts} == {"http-01", "tls-alpn-01"}, attempts
            # Back-off grows: the gap before the 4th failure is longer than before the 2nd.
            gaps = {n: t for n, _, t in attempts}
            if 1 in gaps and 2 in gaps and 3 in gaps and 4 in gaps:
                assert gaps[4] - gaps[3] > gaps[2] - gaps[1]
            wild = manager.status()["*.wild.test"]
            assert wild["state"] == "unsupported" and "DNS-01" in str(wild["last_error"])
            assert manager.status()["good.test"]["state"] == "valid"
            assert store.lookup("good.test") is not None
        finally:
            await manager.close()
            await ports.close()

    run(tmp_path, {}, body)


def test_unreachable_directory_is_a_status_error_not_a_crash(tmp_path: Path) -> None:
    async def body() -> None:
        store = CertStore()
        port = _closed_port()
        s = validate(AcmeSettings, {"directory": f"https://127.0.0.1:{port}/dir", "retry_min": "1s",
                                         "retry_max": "2s"})
        manager = AcmeManager(s, tmp_path / "state", store)
        manager.manage(["a.test"])
        await manager.start()
        try:
            await wait_for(lambda: int(manager.status()["a.test"]["failures"]) >= 2, 20, "failures")  # type: ignore[call-overload]
            st = manager.status()["a.test"]
            assert "cannot reach the ACME directory" in str(st["last_error"])
            assert st["state"] == "retrying" and st["next_attempt"] is not None
        finally:
            await manager.close()

    uvloop.run(asyncio.wait_for(body(), 60))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
