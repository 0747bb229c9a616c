"""ACME parts that need no CA: the RFC 8737 certificate, the tls-alpn-01 challenge type the acme
library no longer ships, name checks, back-off, private files, stored certificates, HTTP-01 lookup."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
from pathlib import Path

import pytest
import trustme
from acme import challenges, messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from josepy.jwk import JWKEC

from edgeward.config.loader import validate
from edgeward.config.schema import AcmeSettings
from edgeward.tls.acme import (
    ACME_IDENTIFIER_OID,
    AcmeManager,
    describe_error,
    retry_delay,
    tls_alpn01_certificate,
    unsupported_reason,
    write_private,
)
from edgeward.tls.certstore import CertStore, _offered_alpn

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"


def test_tls_alpn01_certificate_follows_rfc8737() -> None:
    chain, key = tls_alpn01_certificate("a.example.org", "token.thumb")
    cert = x509.load_pem_x509_certificate(chain)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["a.example.org"]
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumb").digest()  # type: ignore[attr-defined]
    assert b"PRIVATE KEY" in key
    store = CertStore()
    store.set_challenge("a.example.org", chain, key)  # the store accepts it as is


def test_tls_alpn01_challenge_parses_and_answers_with_an_empty_object() -> None:
    body = messages.ChallengeBody.from_json({"type": "tls-alpn-01", "url": "https://ca/chall/1",
                                             "status": "pending", "token": TOKEN})
    chall = body.chall
    assert isinstance(chall, challenges.KeyAuthorizationChallenge) and chall.typ == "tls-alpn-01"
    key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    response = chall.response(key)
    assert response.to_partial_json() == {}  # RFC 8555 7.5.1: the client POSTs "{}"
    assert chall.key_authorization(key).startswith(TOKEN + ".")


@pytest.mark.parametrize(("name", "reason"), [
    ("meet.example.org", None), ("xn--bcher-kva.example", None), ("*.example.org", "DNS-01"),
    ("localhost", "public DNS name"), ("a_b.example.org", "public DNS name"), ("-a.example.org", "public DNS name"),
    ("10.0.0.1", "IP addresses"), ("a..b", "public DNS name"),
])
def test_unsupported_names(name: str, reason: str | None) -> None:
    got = unsupported_reason(name)
    assert (got is None) if reason is None else (got is not None and reason in got)


def test_retry_delay_doubles_up_to_the_maximum() -> None:
    assert [retry_delay(n, 60, 3600) for n in range(1, 9)] == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert retry_delay(10_000, 1, 86400) == 86400


def test_private_files_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private(tmp_path / "k.pem", b"one")
        write_private(tmp_path / "k.pem", b"two")
    finally:
        os.umask(old)
    assert (tmp_path / "k.pem").read_bytes() == b"two"
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]


def test_describe_error_is_one_line_from_the_ca_problem() -> None:
    err = messages.Error.with_code("rateLimited", detail="too many certificates")
    assert describe_error(err) == "CA refused (rateLimited): too many certificates"
    assert describe_error(ValueError("a\nb")) == "ValueError: a"


def _settings(**kw: object) -> AcmeSettings:
    return validate(AcmeSettings, {"directory": "https://127.0.0.1:9/dir", **kw})


def test_stored_certificates_load_at_manage_and_bad_ones_are_reordered(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    ca = trustme.CA()
    good = ca.issue_cert("good.test")
    other = ca.issue_cert("other.test")
    certs = tmp_path / "acme" / "certs"
    for name, leaf, key in (("good.test", good, good), ("wrong.test", other, other), ("broken.test", good, other)):
        (certs / name).mkdir(parents=True)
        (certs / name / "fullchain.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        (certs / name / "key.pem").write_bytes(key.private_key_pem.bytes())
    store = CertStore()
    manager = AcmeManager(_settings(), tmp_path, store)
    with caplog.at_level(logging.WARNING, "edgeward.acme"):
        manager.manage(["good.test", "wrong.test", "broken.test", "new.test"])
    status = manager.status()
    assert status["good.test"]["state"] == "valid" and store.lookup("good.test") is not None
    assert status["good.test"]["renew_at"] is not None
    for name in ("wrong.test", "broken.test", "new.test"):
        assert status[name]["state"] == "pending" and store.lookup(name) is None
    assert "wrong.test: stored certificate unusable" in caplog.text
    assert "broken.test: stored certificate unusable" in caplog.text and "does not match" in caplog.text
    manager.manage(["new.test"])  # a reload dropping good.test takes its certificate out of the store
    assert store.lookup("good.test") is None and list(manager.status()) == ["new.test"]
    assert (certs / "good.test" / "fullchain.pem").exists()


def test_http01_lookup_answers_only_known_well_formed_tokens(tmp_path: Path) -> None:
    manager = AcmeManager(_settings(), tmp_path, CertStore())
    manager._http_tokens[TOKEN] = TOKEN + ".thumb"
    assert manager.http01_response(TOKEN) == TOKEN + ".thumb"
    for bad in ("", "../../etc/passwd", TOKEN + "/x", "a" * 300, "nope"):
        assert manager.http01_response(bad) is None


def test_tls_alpn_disabled_when_the_store_cannot_see_hellos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CertStore()
    monkeypatch.setattr(CertStore, "supports_tls_alpn", property(lambda self: False))
    assert AcmeManager(_settings(), tmp_path, store).challenge_types == ["http-01"]
    with pytest.raises(ValueError, match="1 item"):
        _settings(challenges=[])


def test_close_without_start_and_with_nothing_to_do(tmp_path: Path) -> None:
    async def go() -> None:
        manager = AcmeManager(_settings(), tmp_path, CertStore())
        await manager.close()
        manager.manage(["*.wild.test"])  # unsupported: never ordered
        await manager.start()
        await asyncio.sleep(0.1)
        assert manager.status()["*.wild.test"]["state"] == "unsupported"
        await manager.close()
    asyncio.run(go())
    assert not (tmp_path / "acme" / "accounts").exists()  # nothing ordered, no account made


@given(st.binary(max_size=600))
def test_offered_alpn_never_raises(data: bytes) -> None:
    assert isinstance(_offered_alpn(data), tuple)
    assert isinstance(_offered_alpn(b"\x01\x00\x01\x00" + data), tuple)
