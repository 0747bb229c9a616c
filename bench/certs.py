"""The TLS certificate every contestant terminates with in the HTTPS cases.

One ECDSA P-256 key and a self-signed certificate for `bench.test`, made per run
with the `cryptography` library (an edgeward dependency) into the run's workdir:
the same key, the same one-certificate chain and so the same handshake bytes for
HAProxy, nginx, edgeward and the upstream nginx (`direct`). Self-signed because
no client checks the chain: wrk does not verify, and the harness's probe checks
that each contestant serves exactly this certificate by comparing its DER bytes.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NAME = "bench.test"


@dataclass(frozen=True)
class CertFiles:
    cert: Path  # PEM certificate (the whole chain: one self-signed certificate)
    key: Path  # PEM PKCS#8 private key, mode 0600
    combined: Path  # certificate then key in one file, as HAProxy's `crt` reads it

    def der(self) -> bytes:
        """The certificate's DER bytes, to recognise it in a handshake."""
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        return cert.public_bytes(serialization.Encoding.DER)


def cert_files(directory: Path) -> CertFiles:
    return CertFiles(
        directory / "bench-cert.pem", directory / "bench-key.pem", directory / "bench-cert-key.pem"
    )


def make_certificate(name: str = NAME, days: int = 30) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): ECDSA P-256, SHA-256, subjectAltName DNS:name."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A day back: clock skew between processes never makes it "not yet valid".
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_private(path: Path, data: bytes) -> None:
    # 0600 from the start: edgeward refuses a key file others can read.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def ensure_certificate(directory: Path) -> CertFiles:
    """The run's certificate files in `directory`, made on first use (idempotent, so
    every config rendered for one run names the same key)."""
    files = cert_files(directory)
    if files.cert.exists() and files.key.exists() and files.combined.exists():
        return files
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = make_certificate()
    files.cert.write_bytes(cert_pem)
    _write_private(files.key, key_pem)
    _write_private(files.combined, cert_pem + key_pem)
    return files
