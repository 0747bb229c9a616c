"""CertStore: SNI selection (exact, wildcard, default, none), renewal swap, TLS-ALPN-01 certificate
choice, TLS policy, and clear errors for certificate files that cannot be served.

Handshakes run in-process over memory BIOs (the SSLObject path asyncio and uvloop use) and over
real loopback sockets (the SSLSocket path)."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import threading
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from edgeward.config.loader import validate
from edgeward.tls.certstore import (
    Certificate,
    CertificateError,
    CertStore,
    certificate_from_pem,
    load_certificate_files,
)

CA = trustme.CA()


def leaf(*names: str, key_type: trustme.KeyType = trustme.KeyType.ECDSA,
         not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Certificate:
    lc = CA.issue_cert(*names, key_type=key_type, not_before=not_before, not_after=not_after)
    chain = b"".join(b.bytes() for b in lc.cert_chain_pems)
    return certificate_from_pem(chain, lc.private_key_pem.bytes(), source=f"test:{names[0]}")


def client_ctx(alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    CA.configure_trust(ctx)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


class Pair:
    """A client and a server SSLObject joined by memory BIOs."""

    def __init__(self, server: ssl.SSLContext, sni: str | None, alpn: list[str] | None = None,
                 client: ssl.SSLContext | None = None) -> None:
        cctx = client or client_ctx(alpn)
        if sni is None or not sni[0].isalpha():
            cctx.check_hostname = False
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = cctx.wrap_bio(self.c_in, self.c_out, server_hostname=sni)
        self.server = server.wrap_bio(self.s_in, self.s_out, server_side=True)

    def pump(self) -> None:
        self.s_in.write(self.c_out.read())
        self.c_in.write(self.s_out.read())

    def handshake(self) -> None:
        done_c = done_s = False
        for _ in range(20):
            if not done_c:
                try:
                    self.client.do_handshake()
                    done_c = True
                except ssl.SSLWantReadError:
                    pass
            self.pump()
            if not done_s:
                try:
                    self.server.do_handshake()
                    done_s = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    # The server aborted: deliver its alert, so the client raises what it saw.
                    self.pump()
                    self.client.do_handshake()
                    raise
            self.pump()
            if done_c and done_s:
                return
        raise AssertionError("handshake did not finish")

    def peer_fingerprint(self) -> str:
        import hashlib
        der = self.client.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()

    def roundtrip(self, data: bytes) -> bytes:
        self.client.write(data)
        self.pump()
        got = self.server.read(len(data))
        self.server.write(got)
        self.pump()
        return self.client.read(len(data))


def served(store: CertStore, sni: str | None, alpn: list[str] | None = ["http/1.1"],  # noqa: B006
           check_name: bool = True) -> tuple[str, str | None]:
    p = Pair(store.server_context(), sni, alpn, client=None if check_name and sni else _lenient(alpn))
    p.handshake()
    return p.peer_fingerprint(), p.client.selected_alpn_protocol()


def _lenient(alpn: list[str] | None) -> ssl.SSLContext:
    ctx = client_ctx(alpn)
    ctx.check_hostname = False
    return ctx


A = leaf("a.test")
B = leaf("b.test", key_type=trustme.KeyType.RSA)
WILD = leaf("*.w.test")
EXACT_IN_WILD = leaf("x.w.test")


@pytest.fixture
def store() -> CertStore:
    s = CertStore()
    for slot, cert in (("a", A), ("b", B), ("wild", WILD), ("x", EXACT_IN_WILD)):
        s.put(slot, cert)
    return s


def test_exact_names_select_their_certificate_rsa_and_ecdsa(store: CertStore) -> None:
    assert A.key_type == "ECDSA P-256" and B.key_type == "RSA 2048"
    assert served(store, "a.test") == (A.fingerprint, "http/1.1")
    assert served(store, "b.test")[0] == B.fingerprint
    assert served(store, "A.TEST")[0] == A.fingerprint  # names are case-insensitive


def test_wildcard_covers_one_label_and_exact_beats_it(store: CertStore) -> None:
    assert served(store, "y.w.test")[0] == WILD.fingerprint
    assert served(store, "x.w.test")[0] == EXACT_IN_WILD.fingerprint
    assert store.lookup("w.test") is None  # RFC 6125: the wildcard does not cover its parent
    assert store.lookup("z.y.w.test") is None  # ... nor two labels
    assert store.lookup(".w.test") is None


def test_unknown_name_is_refused_with_unrecognized_name_when_no_default(store: CertStore) -> None:
    for sni in ("c.test", None):
        p = Pair(store.server_context(), sni, client=_lenient(None))
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            p.handshake()
    assert store.counters["handshake_unrecognized_name"] == 2


def test_default_certificate_for_unknown_names_and_clients_without_sni(store: CertStore) -> None:
    store.set_default_name("b.test")
    assert served(store, "unknown.test", check_name=False)[0] == B.fingerprint
    assert served(store, None)[0] == B.fingerprint
    assert served(store, "a.test")[0] == A.fingerprint
    assert store.counters["handshake_default"] == 2
    store.set_default_name("nothing.test")  # a default name no certificate covers: no default
    assert store.lookup("unknown.test") is None


def test_valid_certificate_preferred_over_expired_for_the_same_name() -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    old = leaf("a.test", not_before=past - dt.timedelta(days=90), not_after=past)
    s = CertStore()
    s.put("z-old", old)
    s.put("a-new", A)
    assert old.warnings and "expired" in old.warnings[0]
    assert s.lookup("a.test") == A
    s.remove("a-new")
    assert s.lookup("a.test") == old


def test_replacing_a_slot_serves_new_handshakes_and_keeps_established_connections(store: CertStore) -> None:
    before = Pair(store.server_context(), "a.test")
    before.handshake()
    assert before.peer_fingerprint() == A.fingerprint
    renewed = leaf("a.test")
    store.put("a", renewed)
    after = Pair(store.server_context(), "a.test")
    after.handshake()
    assert after.peer_fingerprint() == renewed.fingerprint
    assert before.roundtrip(b"still here") == b"still here"


def test_alpn_sets_and_certificates_added_before_or_after_a_context() -> None:
    s = CertStore()
    s.put("a", A)
    h1 = s.server_context(("http/1.1",))
    assert s.server_context(("http/1.1",)) is h1
    h2 = s.server_context(("h2", "http/1.1"))
    s.put("b", B)
    for ctx, offer, want in ((h1, ["h2", "http/1.1"], "http/1.1"), (h2, ["h2", "http/1.1"], "h2"),
                             (h1, ["h2"], None)):
        for sni in ("a.test", "b.test"):
            p = Pair(ctx, sni, offer)
            p.handshake()
            assert p.client.selected_alpn_protocol() == want
    with pytest.raises(ValueError, match="acme-tls/1"):
        s.server_context(("acme-tls/1",))


def test_tls12_minimum_and_server_policy(store: CertStore) -> None:
    ctx = store.server_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    old = _lenient(None)
    with pytest.warns(DeprecationWarning):
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        Pair(ctx, "a.test", client=old).handshake()
    tls12 = client_ctx()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    p = Pair(ctx, "a.test", client=tls12)
    p.handshake()
    assert p.client.version() == "TLSv1.2"
    assert p.server.cipher()[0].startswith("ECDHE-ECDSA-")  # type: ignore[index]
    with pytest.raises(ValueError, match=r"below 1\.2"):
        CertStore(minimum_version=ssl.TLSVersion.TLSv1_1)


# -- TLS-ALPN-01 --------------------------------------------------------------------------


def challenge_pems(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "challenge")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _insecure(alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    return ctx


def test_tls_alpn_challenge_served_only_to_acme_tls_offers(store: CertStore) -> None:
    import hashlib
    assert store.supports_tls_alpn
    chain, key = challenge_pems("a.test")
    challenge_fp = hashlib.sha256(x509.load_pem_x509_certificate(chain).public_bytes(serialization.Encoding.DER)).hexdigest()
    ctx = store.server_context()
    store.set_challenge("a.test", chain, key)
    assert store.pending_challenges() == ["a.test"]
    p = Pair(ctx, "a.test", client=_insecure(["acme-tls/1"]))
    p.handshake()
    assert (p.peer_fingerprint(), p.client.selected_alpn_protocol()) == (challenge_fp, "acme-tls/1")
    # Everyone else still gets the real certificate, also while the challenge is pending.
    assert served(store, "a.test", ["h2", "http/1.1"]) == (A.fingerprint, "http/1.1")
    p = Pair(ctx, "b.test", client=_insecure(["acme-tls/1"]))  # no challenge for b.test
    p.handshake()
    assert (p.peer_fingerprint(), p.client.selected_alpn_protocol()) == (B.fingerprint, None)
    store.clear_challenge("a.test")
    assert store.pending_challenges() == []
    p = Pair(ctx, "a.test", client=_insecure(["acme-tls/1"]))
    p.handshake()
    assert (p.peer_fingerprint(), p.client.selected_alpn_protocol()) == (A.fingerprint, None)
    assert store.counters["handshake_acme_tls_alpn"] == 1


def test_tls_alpn_challenge_for_a_name_without_any_certificate_over_real_sockets() -> None:
    """First issuance: no certificate yet, no default; SSLSocket path (a thread serving accept())."""
    import hashlib
    s = CertStore()
    ctx = s.server_context()
    chain, key = challenge_pems("new.test")
    s.set_challenge("new.test", chain, key)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    results: list[object] = []

    def serve() -> None:
        for _ in range(2):
            conn, _addr = lsock.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as t:
                    results.append(t.selected_alpn_protocol())
            except ssl.SSLError as e:
                results.append(e.reason)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    port = lsock.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            _insecure(["acme-tls/1"]).wrap_socket(raw, server_hostname="new.test") as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        assert hashlib.sha256(der).hexdigest() == hashlib.sha256(
            x509.load_pem_x509_certificate(chain).public_bytes(serialization.Encoding.DER)).hexdigest()
    with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        _insecure(["http/1.1"]).wrap_socket(raw, server_hostname="new.test")
    t.join(5)
    lsock.close()
    assert results[0] == "acme-tls/1"


# -- files --------------------------------------------------------------------------------


def write_pair(tmp: Path, cert: Certificate, name: str = "c") -> tuple[Path, Path]:
    c, k = tmp / f"{name}.pem", tmp / f"{name}.key"
    c.write_bytes(cert.chain_pem)
    k.write_bytes(cert.key_pem)
    k.chmod(0o600)
    return c, k


def test_files_load_with_names_validity_and_no_warnings(tmp_path: Path) -> None:
    c, k = write_pair(tmp_path, B)
    cert = load_certificate_files(c, k)
    assert cert.names == ("b.test",) and cert.key_type == "RSA 2048" and cert.warnings == ()
    assert cert.source == str(c) and not cert.expired()
    assert cert.summary()["names"] == ["b.test"]


def test_missing_files_are_named(tmp_path: Path) -> None:
    c, k = write_pair(tmp_path, A)
    with pytest.raises(CertificateError, match=r"nope\.pem: certificate file not found"):
        load_certificate_files(tmp_path / "nope.pem", k)
    with pytest.raises(CertificateError, match=r"nope\.key: private key file not found"):
        load_certificate_files(c, tmp_path / "nope.key")
    with pytest.raises(CertificateError, match="is a directory"):
        load_certificate_files(tmp_path, k)


def test_key_not_matching_the_certificate(tmp_path: Path) -> None:
    c, _ = write_pair(tmp_path, A, "a")
    _, k = write_pair(tmp_path, B, "b")
    with pytest.raises(CertificateError, match=r"b\.key: the private key does not match the certificate in .*a\.pem"):
        load_certificate_files(c, k)


def test_garbage_encrypted_and_weak_keys(tmp_path: Path) -> None:
    c, k = write_pair(tmp_path, A)
    (tmp_path / "junk").write_bytes(b"hello\n")
    with pytest.raises(CertificateError, match=r"junk: no readable PEM certificate"):
        load_certificate_files(tmp_path / "junk", k)
    with pytest.raises(CertificateError, match=r"junk: no readable PEM private key"):
        load_certificate_files(c, tmp_path / "junk")
    key = serialization.load_pem_private_key(A.key_pem, None)
    enc = tmp_path / "enc.key"
    enc.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(CertificateError, match="encrypted"):
        load_certificate_files(c, enc)
    weak = rsa.generate_private_key(65537, 1024)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(weak.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(weak, hashes.SHA256()))
    with pytest.raises(CertificateError, match="1024 bits"):
        certificate_from_pem(cert.public_bytes(serialization.Encoding.PEM),
                             weak.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), source="weak")


def test_warnings_expired_not_yet_valid_no_names_world_readable_and_chain_order(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = leaf("old.test", not_before=now - dt.timedelta(days=100), not_after=now - dt.timedelta(days=1))
    assert any("expired on" in w for w in expired.warnings)
    future = leaf("new.test", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=100))
    assert any("not valid before" in w for w in future.warnings)
    c, k = write_pair(tmp_path, expired)
    k.chmod(0o644)
    loaded = load_certificate_files(c, k)
    assert any("readable by every user" in w for w in loaded.warnings)
    # An expired certificate is still served (with the warning), e.g. while its renewal is failing.
    s = CertStore()
    s.put("old", loaded)
    assert s.lookup("old.test") == loaded
    lc = CA.issue_cert("order.test")
    pems = [b.bytes() for b in lc.cert_chain_pems]
    if len(pems) > 1:  # trustme's chain is leaf + intermediates; swap to break the order
        reordered = certificate_from_pem(pems[0] + pems[-1] + b"".join(pems[1:-1]), lc.private_key_pem.bytes(), source="x")
        assert len(pems) == 2 or any("out of order" in w for w in reordered.warnings)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "noname")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    nameless = certificate_from_pem(cert.public_bytes(serialization.Encoding.PEM),
                                    key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()), source="nameless")
    assert nameless.names == () and nameless.key_type == "ECDSA P-384"
    assert any("no DNS name" in w for w in nameless.warnings)


def test_contexts_leave_no_descriptors_behind() -> None:
    before = len(os.listdir("/proc/self/fd"))
    s = CertStore()
    s.server_context()
    for i in range(20):
        s.put("a", A if i % 2 else B)
    assert len(os.listdir("/proc/self/fd")) == before


def test_configured_files_replace_file_slots_and_report_every_bad_pair(tmp_path: Path) -> None:
    from edgeward.config.schema import TlsSettings
    from edgeward.tls.certstore import load_configured_files, tls_version
    ca, ka = write_pair(tmp_path, A, "a")
    cb, kb = write_pair(tmp_path, B, "b")
    s = CertStore(minimum_version=tls_version("1.3"), default_name="a.test")
    s.put("acme:c.test", leaf("c.test"))
    s.set_file_certificates(load_configured_files(validate(TlsSettings,
        {"certificates": [{"cert": str(ca), "key": str(ka)}, {"cert": str(cb), "key": str(kb)}]})))
    assert s.lookup("b.test") == load_certificate_files(cb, kb)
    assert s.status()["default"] == f"file:{ca}"
    # A reload without b.test's pair drops it; the ACME slot is not touched.
    s.set_file_certificates(load_configured_files(validate(TlsSettings,
        {"certificates": [{"cert": str(ca), "key": str(ka)}]})))
    assert s.lookup("b.test") is not None and s.lookup("b.test") == s.lookup("a.test")  # now the default
    assert s.covers("b.test") is False and s.covers("c.test") is True
    assert sorted(s.slots()) == ["acme:c.test", f"file:{ca}"]
    with pytest.raises(CertificateError) as err:
        load_configured_files(validate(TlsSettings, {"certificates": [
            {"cert": str(tmp_path / "gone.pem"), "key": str(ka)}, {"cert": str(ca), "key": str(kb)}]}))
    assert "gone.pem: certificate file not found" in str(err.value)
    assert "does not match" in str(err.value)
    p = Pair(s.server_context(), "a.test")
    p.handshake()
    assert p.client.version() == "TLSv1.3"
