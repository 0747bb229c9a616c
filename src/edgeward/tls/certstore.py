"""Certificates for TLS termination, chosen by SNI at handshake time.

A `CertStore` holds certificates in named slots ("file:/etc/ssl/a.pem", "acme:meet.example.org"),
indexed by the DNS names of their subjectAltName. `server_context()` returns one stdlib
`ssl.SSLContext` whose `sni_callback` switches each handshake to the context of the
certificate covering the requested name:

- an exact name beats a wildcard; a wildcard ("*.example.org") covers exactly one left-most
  label (RFC 6125 6.4.3: "a.example.org", not "example.org" nor "b.a.example.org");
- a name no certificate covers, or a client that sends no SNI, gets the default certificate
  (the one covering `default_name`); with no default the handshake is aborted with the
  `unrecognized_name` alert, so the edge never shows a certificate for some other name;
- replacing a slot (renewal) swaps an immutable index: new handshakes see the new
  certificate at once, established connections keep the context they were made with.

TLS-ALPN-01 (RFC 8737): while a challenge certificate is set for a name, a handshake for
that name whose ClientHello offers ALPN "acme-tls/1" gets the challenge certificate and
negotiates "acme-tls/1"; every other client keeps getting the real certificate. OpenSSL runs
the SNI callback before ALPN selection and Python exposes neither the offered ALPN list nor
a ClientHello callback, so the store reads the ClientHello through the context's message
callback (`SSLContext._msg_callback`, present since Python 3.8) just before the SNI
callback runs, and only while a challenge is pending (it costs a Python call per TLS message).
Go servers (Caddy/certmagic) get the same information from `ClientHelloInfo.SupportedProtos`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import ssl
import stat
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edgeward.codec.errors import NEED_MORE, TLSError
from edgeward.codec.tls import parse_client_hello
from edgeward.config.schema import Config, TlsSettings

log = logging.getLogger("edgeward.tls")

ACME_TLS_ALPN = "acme-tls/1"
# Mozilla "intermediate" TLS 1.2 suites with forward secrecy and AEAD only; TLS 1.3 suites
# are OpenSSL's defaults (all AEAD).
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
MIN_RSA_BITS = 2048
_CONTENT_HANDSHAKE = 22
_MSG_CLIENT_HELLO = 1
_HAS_MSG_CALLBACK = hasattr(ssl.SSLContext, "_msg_callback")


class CertificateError(Exception):
    """A certificate or key that cannot be served; the message names the file and the reason."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def normalize_name(name: str) -> str:
    """A DNS name as the index keeps it: lower case, no trailing dot."""
    return name.strip().lower().rstrip(".")


@dataclass(frozen=True, slots=True)
class Certificate:
    """A validated certificate chain and its private key."""

    names: tuple[str, ...]  # DNS names of the leaf's subjectAltName, normalized ("*.x.org" kept)
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str  # "ECDSA P-256", "RSA 2048"
    fingerprint: str  # SHA-256 of the leaf (DER), hex
    issuer: str
    source: str  # where it came from: a file path or "acme"
    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    warnings: tuple[str, ...] = ()

    def expired(self, now: dt.datetime | None = None) -> bool:
        return (now or _now()) >= self.not_after

    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    def covers(self, name: str) -> bool:
        n = normalize_name(name)
        return any(_name_matches(pattern, n) for pattern in self.names)

    def summary(self) -> dict[str, object]:
        return {
            "names": list(self.names),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "key_type": self.key_type,
            "issuer": self.issuer,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "warnings": list(self.warnings),
        }


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def certificate_from_pem(chain_pem: bytes, key_pem: bytes, *, source: str,
                         key_source: str | None = None, now: dt.datetime | None = None) -> Certificate:
    """Validate a PEM chain (leaf first) and its PEM private key.

    Raises CertificateError for what cannot be served (no certificate, unreadable or
    encrypted key, unsupported key type, key not matching the leaf); returns warnings for
    what can (expired or not yet valid, chain out of order, no DNS names).
    """
    key_source = key_source or source
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise CertificateError(f"{source}: no readable PEM certificate ({e})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertificateError(f"{key_source}: the private key is encrypted; edgeward needs it unencrypted "
                               "(protect it with file permissions, mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"{key_source}: no readable PEM private key ({e})") from None
    leaf = chain[0]
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise CertificateError(f"{key_source}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} needed")
        key_type = f"RSA {key.key_size}"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        key_type = f"ECDSA {_curve_label(key.curve)}"
    else:
        raise CertificateError(f"{key_source}: unsupported key type {type(key).__name__} (use RSA or ECDSA)")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise CertificateError(f"{key_source}: the private key does not match the certificate in {source} "
                               "(the first certificate of the chain must be the one the key belongs to)")
    warnings: list[str] = []
    names: list[str] = []
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [normalize_name(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        pass
    if not names:
        # RFC 6125 6.4.4: clients ignore the subject CN once SANs exist, and browsers ignore it always.
        warnings.append("no DNS name in subjectAltName: usable only as the default certificate")
    moment = now or _now()
    not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if moment >= not_after:
        warnings.append(f"expired on {not_after.isoformat()}")
    elif moment < not_before:
        warnings.append(f"not valid before {not_before.isoformat()}")
    for i in range(len(chain) - 1):
        if chain[i].issuer != chain[i + 1].subject:
            warnings.append(f"chain out of order: certificate {i + 1} did not issue certificate {i}")
            break
    return Certificate(
        names=tuple(dict.fromkeys(names)),
        not_before=not_before,
        not_after=not_after,
        key_type=key_type,
        fingerprint=hashlib.sha256(leaf.public_bytes(der)).hexdigest(),
        issuer=leaf.issuer.rfc4514_string(),
        source=source,
        chain_pem=chain_pem,
        key_pem=key_pem,
        warnings=tuple(warnings),
    )


def _curve_label(curve: ec.EllipticCurve) -> str:
    return {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(curve.name, curve.name)


def load_certificate_files(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> Certificate:
    """Read and validate a PEM chain file and its key file (see `certificate_from_pem`)."""
    cert_p, key_p = Path(cert_path), Path(key_path)
    chain_pem = _read(cert_p, "certificate")
    key_pem = _read(key_p, "private key")
    cert = certificate_from_pem(chain_pem, key_pem, source=str(cert_p), key_source=str(key_p))
    with contextlib.suppress(OSError):
        if os.stat(key_p).st_mode & stat.S_IROTH:
            cert = _with_warning(cert, f"private key {key_p} is readable by every user (chmod 0600 or 0640)")
    return cert


def _with_warning(cert: Certificate, warning: str) -> Certificate:
    return Certificate(cert.names, cert.not_before, cert.not_after, cert.key_type, cert.fingerprint, cert.issuer,
                       cert.source, cert.chain_pem, cert.key_pem, (*cert.warnings, warning))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise CertificateError(f"{path}: is a directory, expected a PEM {what} file") from None
    except PermissionError:
        raise CertificateError(f"{path}: permission denied reading the {what}") from None
    except OSError as e:
        raise CertificateError(f"{path}: cannot read the {what} ({e.strerror})") from None


def tls_version(min_version: str) -> ssl.TLSVersion:
    """The `[tls] min_version` setting ("1.2", "1.3") as an ssl.TLSVersion."""
    return {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[min_version]


def load_configured_files(settings: TlsSettings) -> dict[str, Certificate]:
    """Every `[tls] certificates` pair, validated, by slot ("file:<cert path>").

    Raises one CertificateError listing every pair that cannot be served, so that `check`
    and a reload report them all at once (a reload keeps the running certificates then).
    """
    certs: dict[str, Certificate] = {}
    problems: list[str] = []
    for pair in settings.certificates:
        try:
            certs[f"file:{pair.cert}"] = load_certificate_files(pair.cert, pair.key)
        except CertificateError as e:
            problems.append(str(e))
    if problems:
        raise CertificateError("; ".join(problems))
    return certs


def base_server_context(minimum_version: ssl.TLSVersion, alpn: Iterable[str]) -> ssl.SSLContext:
    """A server context with the edge's TLS policy and no certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum_version
    ctx.options |= (ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
                    | ssl.OP_SINGLE_ECDH_USE)
    ctx.set_ciphers(TLS12_CIPHERS)
    protocols = list(alpn)
    if protocols:
        ctx.set_alpn_protocols(protocols)
    return ctx


def context_with_certificate(chain_pem: bytes, key_pem: bytes, minimum_version: ssl.TLSVersion,
                             alpn: Iterable[str]) -> ssl.SSLContext:
    """A server context serving exactly these PEM bytes.

    stdlib ssl loads certificates only from paths; memfds give it the validated bytes
    themselves, with no temporary file on disk and no window for a file to change in between.
    """
    ctx = base_server_context(minimum_version, alpn)
    fds = [os.memfd_create("edgeward-cert", os.MFD_CLOEXEC), os.memfd_create("edgeward-key", os.MFD_CLOEXEC)]
    try:
        os.write(fds[0], chain_pem)
        os.write(fds[1], key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)
    return ctx


@dataclass(frozen=True, slots=True)
class _Entry:
    slot: str
    cert: Certificate
    contexts: Mapping[tuple[str, ...], ssl.SSLContext]  # one per ALPN set of server_context()


@dataclass(frozen=True, slots=True)
class _Index:
    exact: Mapping[str, _Entry]
    wildcard: Mapping[str, _Entry]  # "example.org" for "*.example.org"
    default: _Entry | None

    def named(self, name: str) -> _Entry | None:
        """The entry covering `name` by itself: exact first, then a one-label wildcard."""
        if not name:
            return None
        entry = self.exact.get(name)
        if entry is not None:
            return entry
        head, dot, rest = name.partition(".")
        return self.wildcard.get(rest) if dot and head else None

    def lookup(self, name: str) -> _Entry | None:
        entry = self.named(name)
        return entry if entry is not None else self.default


_EMPTY = _Index({}, {}, None)


def _preference(entry: _Entry) -> tuple[bool, dt.datetime, str]:
    # A valid certificate beats an expired one; then the one that lasts longest; then the slot
    # name, so that the choice never depends on insertion order.
    return (not entry.cert.expired(), entry.cert.not_after, entry.slot)


class CertStore:
    """Certificates by slot, indexed by name, served through `server_context()`.

    Mutations (put, remove, set_challenge, ...) are meant for the event-loop thread; each
    builds a new immutable index and swaps it in one assignment, so a handshake running
    in any thread sees either the old or the new index, never a half-built one.
    """

    def __init__(self, *, minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
                 default_name: str | None = None) -> None:
        if minimum_version < ssl.TLSVersion.TLSv1_2:
            raise ValueError("TLS versions below 1.2 are not served")
        self.minimum_version = minimum_version
        self._default_name = normalize_name(default_name) if default_name else None
        self._entries: dict[str, _Entry] = {}
        self._index = _EMPTY
        self._mains: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._challenges: dict[str, ssl.SSLContext] = {}
        # Connections whose ClientHello offered acme-tls/1, noted by the message callback just
        # before their SNI callback runs; weak so that an aborted handshake leaves nothing behind.
        self._offers_acme: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()
        self.counters: dict[str, int] = {"handshake_default": 0, "handshake_unrecognized_name": 0,
                                         "handshake_acme_tls_alpn": 0}
        # The PEMs of the challenge certificates served now, and who wants to hear of every change of
        # slots or challenges: with workers, the master's store is copied into each worker's.
        self.challenge_pems: dict[str, tuple[bytes, bytes]] = {}
        self.on_change: list[Callable[[], None]] = []

    # -- certificates ---------------------------------------------------------------------

    def put(self, slot: str, cert: Certificate) -> None:
        """Add or replace the certificate of a slot; new handshakes use it at once."""
        contexts = {alpn: context_with_certificate(cert.chain_pem, cert.key_pem, self.minimum_version, alpn)
                    for alpn in self._mains}
        self._entries[slot] = _Entry(slot, cert, contexts)
        self._reindex()
        self._changed()

    def remove(self, slot: str) -> None:
        if self._entries.pop(slot, None) is not None:
            self._reindex()
            self._changed()

    def _changed(self) -> None:
        for fn in self.on_change:
            fn()

    def set_file_certificates(self, certs: Mapping[str, Certificate]) -> None:
        """Make the "file:" slots exactly `certs` (from `load_configured_files`), at start and on reload."""
        for slot in [s for s in self._entries if s.startswith("file:") and s not in certs]:
            del self._entries[slot]
        for slot, cert in certs.items():
            old = self._entries.get(slot)
            if old is None or old.cert.fingerprint != cert.fingerprint:
                self.put(slot, cert)
        self._reindex()
        for slot, cert in certs.items():
            for warning in cert.warnings:
                log.warning("tls: %s: %s", slot.removeprefix("file:"), warning)

    def status(self) -> dict[str, object]:
        """Certificates by slot, the default, pending challenges and handshake counters."""
        return {
            "certificates": {slot: e.cert.summary() for slot, e in sorted(self._entries.items())},
            "default": self._index.default.slot if self._index.default else None,
            "pending_challenges": self.pending_challenges(),
            "counters": dict(self.counters),
        }

    def get(self, slot: str) -> Certificate | None:
        entry = self._entries.get(slot)
        return entry.cert if entry else None

    def slots(self) -> dict[str, Certificate]:
        return {slot: e.cert for slot, e in self._entries.items()}

    @property
    def default_name(self) -> str | None:
        return self._default_name

    def set_default_name(self, name: str | None) -> None:
        """Serve the certificate covering `name` to clients whose SNI no certificate covers."""
        self._default_name = normalize_name(name) if name else None
        self._reindex()

    def lookup(self, server_name: str | None) -> Certificate | None:
        """The certificate a handshake for this SNI gets (the default one included), or None."""
        entry = self._index.lookup(normalize_name(server_name or ""))
        return entry.cert if entry else None

    def covers(self, name: str) -> bool:
        """Whether a certificate covers this name by itself (the default certificate not counted)."""
        n = normalize_name(name)
        return any(e.cert.covers(n) for e in self._entries.values())

    def _reindex(self) -> None:
        exact: dict[str, _Entry] = {}
        wildcard: dict[str, _Entry] = {}
        for entry in sorted(self._entries.values(), key=_preference, reverse=True):
            for name in entry.cert.names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], entry)
                else:
                    exact.setdefault(name, entry)
        default = None
        if self._default_name:
            default = _Index(exact, wildcard, None).named(self._default_name)
        self._index = _Index(exact, wildcard, default)

    # -- contexts -------------------------------------------------------------------------

    def server_context(self, alpn: Iterable[str] = ("http/1.1",)) -> ssl.SSLContext:
        """The one context a terminating listener wraps its sockets with.

        The same ALPN set always gets the same context. Its own certificate is none: the SNI
        callback moves every handshake to a certificate's context or aborts it.
        """
        key = tuple(alpn)
        if ACME_TLS_ALPN in key:
            raise ValueError(f"{ACME_TLS_ALPN} is negotiated only for pending challenges")
        ctx = self._mains.get(key)
        if ctx is not None:
            return ctx
        ctx = base_server_context(self.minimum_version, key)
        ctx.sni_callback = lambda conn, server_name, _ctx: self._on_sni(key, conn, server_name)
        self._mains[key] = ctx
        # Certificates already held get a context for this ALPN set too.
        for slot, entry in list(self._entries.items()):
            contexts = dict(entry.contexts)
            contexts[key] = context_with_certificate(entry.cert.chain_pem, entry.cert.key_pem,
                                                     self.minimum_version, key)
            self._entries[slot] = _Entry(slot, entry.cert, contexts)
        self._reindex()
        if self._challenges:
            self._watch_hellos(ctx, True)
        return ctx

    def _on_sni(self, alpn: tuple[str, ...], conn: ssl.SSLObject | ssl.SSLSocket,
                server_name: str | None) -> int | None:
        # Runs inside the handshake: it must not raise (that aborts with handshake_failure and
        # prints a traceback) and must not block.
        name = normalize_name(server_name) if server_name else ""
        if self._challenges and self._offers_acme.pop(conn, False):
            challenge = self._challenges.get(name)
            if challenge is not None:
                self.counters["handshake_acme_tls_alpn"] += 1
                conn.context = challenge
                return None
        index = self._index
        entry = index.named(name)
        if entry is None:
            entry = index.default
            if entry is None:
                self.counters["handshake_unrecognized_name"] += 1
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            self.counters["handshake_default"] += 1
        target = entry.contexts.get(alpn)
        if target is None:  # cannot happen: put() and server_context() build every pair
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        conn.context = target
        return None

    # -- TLS-ALPN-01 ----------------------------------------------------------------------

    @property
    def supports_tls_alpn(self) -> bool:
        """Whether this Python lets the store see the ALPN offer before the SNI callback."""
        return _HAS_MSG_CALLBACK

    def set_challenge(self, name: str, chain_pem: bytes, key_pem: bytes) -> None:
        """Serve this RFC 8737 certificate to `name` handshakes offering acme-tls/1."""
        if not _HAS_MSG_CALLBACK:
            raise RuntimeError("this Python's ssl module has no message callback: TLS-ALPN-01 is unavailable")
        ctx = context_with_certificate(chain_pem, key_pem, ssl.TLSVersion.TLSv1_2, (ACME_TLS_ALPN,))
        first = not self._challenges
        self._challenges = {**self._challenges, normalize_name(name): ctx}
        self.challenge_pems = {**self.challenge_pems, normalize_name(name): (chain_pem, key_pem)}
        if first:
            for main in self._mains.values():
                self._watch_hellos(main, True)
        self._changed()

    def clear_challenge(self, name: str) -> None:
        n = normalize_name(name)
        if n not in self._challenges:
            return
        self._challenges = {k: v for k, v in self._challenges.items() if k != n}
        self.challenge_pems = {k: v for k, v in self.challenge_pems.items() if k != n}
        if not self._challenges:
            for main in self._mains.values():
                self._watch_hellos(main, False)
        self._changed()

    def pending_challenges(self) -> list[str]:
        return sorted(self._challenges)

    def _watch_hellos(self, ctx: ssl.SSLContext, on: bool) -> None:
        # Connections created while it was off are not watched: they cannot get a challenge
        # certificate, which only delays validation to the ACME server's next attempt.
        ctx._msg_callback = self._on_tls_message if on else None  # type: ignore[attr-defined]

    def _on_tls_message(self, conn: object, direction: str, _version: object, content_type: int,
                        msg_type: int, data: bytes) -> None:
        if direction != "read" or content_type != _CONTENT_HANDSHAKE or msg_type != _MSG_CLIENT_HELLO:
            return
        if ACME_TLS_ALPN.encode() not in data:  # cheap test first: browsers never offer it
            return
        if ACME_TLS_ALPN in _offered_alpn(data):
            self._offers_acme[conn] = True


def _offered_alpn(handshake_message: bytes) -> tuple[str, ...]:
    """ALPN ids of a ClientHello handshake message (type, length, body), () when unreadable."""
    records = b"".join(
        b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (handshake_message[i:i + 16384] for i in range(0, len(handshake_message), 16384))
    )
    try:
        hello = parse_client_hello(records)
    except TLSError:
        return ()
    if hello is NEED_MORE:
        return ()
    return hello.alpn


def config_problems(cfg: Config) -> Iterator[tuple[tuple[str | int, ...], str, str]]:
    """Every `[tls] certificates` pair that cannot be served, placed at its entry (a check for
    `edgeward.config.loader.load`, so `edgeward check` and a reload name the file and the line)."""
    for i, pair in enumerate(cfg.tls.certificates):
        try:
            load_certificate_files(pair.cert, pair.key)
        except CertificateError as e:
            yield ("tls", "certificates", i), str(e), "give a readable PEM certificate chain and its unencrypted key"
