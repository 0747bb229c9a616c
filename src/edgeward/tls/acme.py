"""ACME certificates (RFC 8555) for the names the edge terminates, kept in the state directory.

`AcmeManager` keeps one certificate per name (like Caddy: one name that cannot get a
certificate never holds up the others) and puts each into the `CertStore` slot
"acme:<name>". It orders through the `acme` library, whose calls block, so they run on a
small thread pool of their own and the event loop never waits on the network; every
other step (scheduling, challenge responders, the store) happens on the loop thread.

Challenges: HTTP-01 through `http01_response(token)`, which the port-80 handler calls for
`/.well-known/acme-challenge/<token>`, and TLS-ALPN-01 (RFC 8737) through the store's
challenge certificates. After a failed attempt the next configured type is tried.

Renewal starts when `renew_before` (or `renew_fraction` of the lifetime) remains; failures
back off exponentially from `retry_min` to `retry_max`.

Layout of `<state_dir>/acme/` (directories 0700, keys 0600):
  accounts/<directory host>-<hash>/account.key   the account key (PEM, ECDSA P-256)
  accounts/<directory host>-<hash>/account.json  its registration (URI), one per directory URL
  certs/<name>/fullchain.pem, certs/<name>/key.pem
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from edgeward.config.schema import AcmeSettings
from edgeward.tls.certstore import (
    Certificate,
    CertificateError,
    CertStore,
    certificate_from_pem,
    normalize_name,
)

log = logging.getLogger("edgeward.acme")

T = TypeVar("T")
State = Literal["pending", "ordering", "valid", "renewing", "retrying", "unsupported"]
USER_AGENT = "edgeward-acme"
# RFC 8737 3: id-pe-acmeIdentifier
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


# The acme library dropped its TLS-ALPN-01 classes with their pyOpenSSL helpers. The
# challenge is a plain key-authorization challenge (RFC 8737 3); registering it lets
# the library parse it from authorizations and answer it with "{}" like HTTP-01.
if "tls-alpn-01" not in challenges.ChallengeResponse.TYPES:

    @challenges.ChallengeResponse.register
    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        typ = "tls-alpn-01"


if "tls-alpn-01" not in challenges.Challenge.TYPES:

    @challenges.Challenge.register
    class TLSALPN01(challenges.KeyAuthorizationChallenge):
        typ = "tls-alpn-01"
        response_cls = challenges.ChallengeResponse.TYPES["tls-alpn-01"]  # type: ignore[assignment]

        def validation(self, account_key: JWK, **unused_kwargs: Any) -> str:
            return self.key_authorization(account_key)


def tls_alpn01_certificate(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """The RFC 8737 self-signed certificate for `name`: (chain PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    digest = hashlib.sha256(key_authorization.encode()).digest()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME challenge")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # The extension's value is the DER OCTET STRING of the digest (RFC 8737 3).
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def unsupported_reason(name: str) -> str | None:
    """Why ACME with HTTP-01/TLS-ALPN-01 cannot get a certificate for `name`, or None."""
    if name.startswith("*."):
        return "a wildcard name needs the DNS-01 challenge, which edgeward does not do"
    labels = name.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return "not a public DNS name (letters, digits and '-' in dot-separated labels)"
    if labels[-1].isdigit():
        return "IP addresses are not ordered"
    return None


def retry_delay(failures: int, retry_min: float, retry_max: float) -> float:
    """Wait after the n-th consecutive failure: retry_min, doubling, at most retry_max."""
    return float(min(retry_max, retry_min * 2 ** min(failures - 1, 64)))


def new_private_key(key_type: str) -> bytes:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "ecdsa-p384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif key_type == "rsa2048":
        key = rsa.generate_private_key(65537, 2048)
    elif key_type == "rsa4096":
        key = rsa.generate_private_key(65537, 4096)
    else:
        raise ValueError(f"unknown key type {key_type!r}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` atomically with `data`, created with `mode` (never briefly wider)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def private_dir(path: Path, root: Path) -> Path:
    """Create `root` and every directory below it down to `path`, each mode 0700."""
    d = root
    for part in ("", *path.relative_to(root).parts):
        d = d / part
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    return path


def describe_error(exc: BaseException) -> str:
    """One line for the log and `status`: what the CA or the network said."""
    if isinstance(exc, errors.ValidationError):
        parts = []
        for authzr in exc.failed_authzrs:
            for challb in authzr.body.challenges:
                if challb.error is not None:
                    detail = challb.error.detail or challb.error.typ
                    parts.append(f"{challb.chall.typ} validation failed: {detail}")
        return "; ".join(parts) or "validation failed"
    if isinstance(exc, messages.Error):
        kind = (exc.typ or "").rsplit(":", 1)[-1]
        return f"CA refused ({kind}): {exc.detail or exc.title or exc.description or ''}".strip()
    if isinstance(exc, errors.TimeoutError):
        return "order timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS error talking to the ACME directory (set acme.ca_file?): {_first_line(exc)}"
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return f"cannot reach the ACME directory: {_first_line(exc)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


@dataclass
class NameState:
    name: str
    state: State = "pending"
    cert: Certificate | None = None
    last_error: str | None = None
    failures: int = 0
    next_attempt: float = 0.0  # wall clock; 0 = as soon as possible
    last_issued: float | None = None
    challenge: str | None = None  # type used by the last attempt
    cursor: int = 0  # index into the preferred challenge types, moved on by failures
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def status(self, renew_at: float | None) -> dict[str, object]:
        def iso(t: float | None) -> str | None:
            return dt.datetime.fromtimestamp(t, dt.UTC).isoformat() if t else None
        return {
            "state": self.state,
            "not_before": self.cert.not_before.isoformat() if self.cert else None,
            "not_after": self.cert.not_after.isoformat() if self.cert else None,
            "issuer": self.cert.issuer if self.cert else None,
            "renew_at": iso(renew_at),
            "last_error": self.last_error,
            "failures": self.failures,
            "next_attempt": iso(self.next_attempt) if self.state in ("pending", "retrying") else None,
            "last_issued": iso(self.last_issued),
            "challenge": self.challenge,
        }


class AcmeManager:
    """Keeps a certificate for every managed name in the store, from an ACME CA.

    Lifecycle: `manage(names)` (at start and on reload), `await start()`, then
    `await close()`. Everything but the worker threads runs on the event loop. Changed
    `[acme]` settings take a new manager (close the old one first); names whose certificate
    comes from a file should not be managed.
    """

    def __init__(self, settings: AcmeSettings, state_dir: str | os.PathLike[str], store: CertStore,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.root = Path(state_dir) / "acme"
        self._names: dict[str, NameState] = {}
        self._http_tokens: dict[str, str] = {}
        self.on_http01: list[Callable[[], None]] = []  # told when a token is armed or dropped (workers)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._account_lock = asyncio.Lock()
        self._account: _Account | None = None
        types = list(dict.fromkeys(settings.challenges))
        if "tls-alpn-01" in types and not store.supports_tls_alpn:
            log.warning("acme: this Python cannot serve TLS-ALPN-01 challenges; using %s only",
                        ", ".join(t for t in types if t != "tls-alpn-01") or "nothing")
            types = [t for t in types if t != "tls-alpn-01"]
        self.challenge_types = types

    # -- public API -----------------------------------------------------------------------

    def manage(self, names: Iterable[str]) -> None:
        """Keep certificates for exactly these names (a reload may add or drop some).

        A new name's stored certificate is loaded at once; a dropped name's certificate
        leaves the store (its files stay, for when it comes back).
        """
        wanted = list(dict.fromkeys(normalize_name(n) for n in names))
        for gone in set(self._names) - set(wanted):
            st = self._names.pop(gone)
            if st.task is not None:
                st.task.cancel()
            self.store.remove(self.slot(gone))
        for name in wanted:
            if name in self._names:
                continue
            st = NameState(name)
            self._names[name] = st
            reason = unsupported_reason(name)
            if reason is not None:
                st.state, st.last_error = "unsupported", reason
                log.warning("acme: %s: no certificate can be ordered: %s", name, reason)
                continue
            self._load_stored(st)
        self._wake.set()

    async def start(self) -> None:
        if self._scheduler is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(self.settings.concurrency,
                                                               thread_name_prefix="edgeward-acme")
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name="acme-scheduler")

    async def close(self) -> None:
        tasks = [st.task for st in self._names.values() if st.task is not None]
        if self._scheduler is not None:
            tasks.append(self._scheduler)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._scheduler = None
        if self._executor is not None:
            # A worker inside a request finishes it (bounded by the network timeout) on its own.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def http01_response(self, token: str) -> str | None:
        """The key authorization to answer GET /.well-known/acme-challenge/<token> with, or None."""
        if not _TOKEN.match(token):
            return None
        return self._http_tokens.get(token)

    def http01_tokens(self) -> dict[str, str]:
        """The HTTP-01 answers armed now (token → key authorization)."""
        return dict(self._http_tokens)

    def _tokens_changed(self) -> None:
        for fn in self.on_http01:
            fn()

    def status(self) -> dict[str, dict[str, object]]:
        return {name: st.status(self.renew_at(st)) for name, st in sorted(self._names.items())}

    def slot(self, name: str) -> str:
        return f"acme:{name}"

    def renew_at(self, st: NameState) -> float | None:
        if st.cert is None:
            return None
        if self.settings.renew_before is not None:
            ahead = self.settings.renew_before
        else:
            ahead = st.cert.lifetime().total_seconds() * self.settings.renew_fraction
        return st.cert.not_after.timestamp() - ahead

    # -- scheduling -----------------------------------------------------------------------

    def _due(self, st: NameState) -> float | None:
        if st.state == "unsupported" or st.task is not None:
            return None
        if st.state == "retrying" or st.cert is None:
            return st.next_attempt
        renew = self.renew_at(st)
        assert renew is not None
        # A renew_before longer than the lifetime would renew without pause: keep retry_min apart.
        if st.last_issued is not None:
            renew = max(renew, st.last_issued + self.settings.retry_min)
        return renew

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            running = sum(1 for st in self._names.values() if st.task is not None)
            soonest: float | None = None
            for st in sorted(self._names.values(), key=lambda s: self._due(s) or 0.0):
                due = self._due(st)
                if due is None:
                    continue
                if due <= now and running < self.settings.concurrency:
                    st.task = asyncio.get_running_loop().create_task(self._attempt(st), name=f"acme:{st.name}")
                    running += 1
                elif due > now:
                    soonest = due if soonest is None else min(soonest, due)
            # Sleep until the next due name, a finished order (it sets _wake) or a change of names;
            # at most an hour, so that a changed wall clock is noticed.
            timeout = 3600.0 if soonest is None else max(0.05, min(3600.0, soonest - now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _attempt(self, st: NameState) -> None:
        renewing = st.cert is not None and not st.cert.expired()
        st.state = "renewing" if renewing else "ordering"
        try:
            cert = await self._order(st)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            st.failures += 1
            st.last_error = describe_error(exc)
            delay = retry_delay(st.failures, self.settings.retry_min, self.settings.retry_max)
            st.next_attempt = self.clock() + delay
            st.state = "retrying"
            st.cursor += 1
            log.warning("acme: %s: attempt %d failed: %s; next attempt in %s", st.name, st.failures,
                        st.last_error, _human(delay))
        else:
            st.cert, st.state, st.failures, st.last_error = cert, "valid", 0, None
            st.last_issued = self.clock()
            self.store.put(self.slot(st.name), cert)
            renew = self.renew_at(st)
            log.info("acme: %s: certificate issued by %s, valid until %s, renewal from %s", st.name,
                     cert.issuer, cert.not_after.isoformat(),
                     dt.datetime.fromtimestamp(renew or 0, dt.UTC).isoformat())
        finally:
            st.task = None
            self._wake.set()

    # -- one order ------------------------------------------------------------------------

    async def _order(self, st: NameState) -> Certificate:
        loop = asyncio.get_running_loop()

        def run(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
            return loop.run_in_executor(self._executor, fn, *args)

        account = await self._ensure_account()
        key_pem = await run(new_private_key, self.settings.key_type)
        csr_pem = crypto_util.make_csr(key_pem, [st.name])
        acme_client = client.ClientV2(account.directory, account.network())
        log.info("acme: %s: ordering a certificate from %s", st.name, self.settings.directory)
        try:
            orderr = await run(acme_client.new_order, csr_pem)
        except messages.Error as exc:
            if exc.code != "accountDoesNotExist":
                raise
            # The CA forgot the account (a reset CA, a test CA restarted): register the same key again.
            log.warning("acme: %s does not know the account any more; registering again", self.settings.directory)
            account = await self._ensure_account(stale=account)
            acme_client = client.ClientV2(account.directory, account.network())
            orderr = await run(acme_client.new_order, csr_pem)
        cleanups: list[Callable[[], None]] = []
        try:
            for authzr in orderr.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue  # the CA remembers an earlier validation
                challb = self._pick_challenge(st, authzr)
                cleanups.append(self._arm(challb, authzr.body.identifier.value, account.key))
                await run(acme_client.answer_challenge, challb, challb.chall.response(account.key))
            deadline = dt.datetime.now() + dt.timedelta(seconds=self.settings.order_timeout)
            orderr = await run(acme_client.poll_and_finalize, orderr, deadline)
        finally:
            for undo in cleanups:
                undo()
        chain_pem = orderr.fullchain_pem.encode()
        cert = certificate_from_pem(chain_pem, key_pem, source="acme")
        if not cert.covers(st.name):
            raise CertificateError(f"the CA issued a certificate for {cert.names}, not {st.name}")
        await run(self._save, st.name, chain_pem, key_pem)
        return cert

    def _pick_challenge(self, st: NameState, authzr: messages.AuthorizationResource) -> messages.ChallengeBody:
        offered = {c.chall.typ: c for c in authzr.body.challenges
                   if isinstance(c.chall, challenges.KeyAuthorizationChallenge)}
        usable = [t for t in self.challenge_types if t in offered]
        if not usable:
            raise CertificateError(f"the CA offers {sorted(offered) or 'no'} challenges; configured: "
                                   f"{self.challenge_types}")
        typ = usable[st.cursor % len(usable)]
        st.challenge = typ
        log.info("acme: %s: answering %s", st.name, typ)
        return offered[typ]

    def _arm(self, challb: messages.ChallengeBody, name: str, account_key: JWK) -> Callable[[], None]:
        """Start answering a challenge; returns what stops it."""
        chall = challb.chall
        assert isinstance(chall, challenges.KeyAuthorizationChallenge)
        key_authorization = chall.key_authorization(account_key)
        if chall.typ == "http-01":
            token = chall.encode("token")
            self._http_tokens[token] = key_authorization
            self._tokens_changed()

            def disarm() -> None:
                self._http_tokens.pop(token, None)
                self._tokens_changed()
            return disarm
        chain_pem, key_pem = tls_alpn01_certificate(name, key_authorization)
        self.store.set_challenge(name, chain_pem, key_pem)
        return lambda: self.store.clear_challenge(name)

    # -- account --------------------------------------------------------------------------

    def _account_dir(self) -> Path:
        url = urllib.parse.urlsplit(self.settings.directory)
        digest = hashlib.sha256(self.settings.directory.encode()).hexdigest()[:10]
        host = re.sub(r"[^A-Za-z0-9.-]", "_", url.hostname or "directory")
        return self.root / "accounts" / f"{host}-{url.port or 443}-{digest}"

    async def _ensure_account(self, *, stale: _Account | None = None) -> _Account:
        """The account, loaded or registered once; `stale`: the CA forgot that one, register again
        (unless another order already did)."""
        async with self._account_lock:
            current = self._account
            if current is None or (stale is not None and current is stale):
                loop = asyncio.get_running_loop()
                current = await loop.run_in_executor(self._executor, self._load_or_register, stale is not None)
                self._account = current
            return current

    def _load_or_register(self, fresh: bool = False) -> _Account:
        """Runs on a worker thread. `fresh`: ignore the stored registration, register the key again."""
        adir = private_dir(self._account_dir(), self.root)
        key_path, reg_path = adir / "account.key", adir / "account.json"
        if key_path.exists():
            key_obj = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key_obj, ec.EllipticCurvePrivateKey):
                raise CertificateError(f"{key_path}: the account key must be ECDSA P-256")
        else:
            key_obj = ec.generate_private_key(ec.SECP256R1())
            write_private(key_path, key_obj.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        key = JWKEC(key=key_obj)
        account = _Account(self.settings, key)
        directory = client.ClientV2.get_directory(self.settings.directory, account.network())
        account.directory = directory
        if reg_path.exists() and not fresh:
            account.registration = messages.RegistrationResource.json_loads(reg_path.read_text())
            return account
        acme_client = client.ClientV2(directory, account.network())
        reg = messages.NewRegistration.from_data(email=self.settings.email, terms_of_service_agreed=True)
        try:
            regr = acme_client.new_account(reg)
        except errors.ConflictError as exists:
            # The key is known already (its registration file was lost): fetch it.
            regr = messages.RegistrationResource(uri=str(exists), body=messages.Registration())
            regr = acme_client.query_registration(regr)
        account.registration = regr
        write_private(reg_path, regr.json_dumps(indent=2).encode())
        tos = directory.meta.terms_of_service if directory.meta else None
        log.info("acme: account registered at %s (terms of service agreed: %s)", self.settings.directory,
                 tos or "none published")
        return account

    # -- storage --------------------------------------------------------------------------

    def _cert_dir(self, name: str) -> Path:
        return self.root / "certs" / name

    def _save(self, name: str, chain_pem: bytes, key_pem: bytes) -> None:
        """Runs on a worker thread. Key first: a crash between the two renames leaves a
        mismatched pair, which loading rejects (and the name is ordered again)."""
        d = private_dir(self._cert_dir(name), self.root)
        write_private(d / "key.pem", key_pem)
        write_private(d / "fullchain.pem", chain_pem, 0o644)
        (d / "meta.json").write_text(json.dumps({"name": name, "directory": self.settings.directory,
                                                 "issued": dt.datetime.now(dt.UTC).isoformat()}))

    def _load_stored(self, st: NameState) -> None:
        d = self._cert_dir(st.name)
        chain, key = d / "fullchain.pem", d / "key.pem"
        if not chain.exists():
            return
        try:
            cert = certificate_from_pem(chain.read_bytes(), key.read_bytes(), source=str(chain),
                                        key_source=str(key))
            if not cert.covers(st.name):
                raise CertificateError(f"{chain}: covers {list(cert.names)}, not {st.name}")
        except (OSError, CertificateError) as exc:
            log.warning("acme: %s: stored certificate unusable, ordering a new one: %s", st.name, exc)
            return
        st.cert = cert
        st.state = "valid"
        self.store.put(self.slot(st.name), cert)
        if cert.expired():
            log.warning("acme: %s: stored certificate expired on %s; renewing", st.name, cert.not_after.isoformat())
        else:
            log.info("acme: %s: loaded certificate valid until %s", st.name, cert.not_after.isoformat())


class _Account:
    """The account key and registration, and a fresh `ClientNetwork` per order (a requests
    session and its nonces are not shared between threads)."""

    def __init__(self, settings: AcmeSettings, key: JWK) -> None:
        self.settings = settings
        self.key = key
        self.registration: messages.RegistrationResource | None = None
        self.directory: messages.Directory = messages.Directory({})

    def network(self) -> client.ClientNetwork:
        net = client.ClientNetwork(self.key, account=self.registration, alg=ES256, user_agent=USER_AGENT,
                                   timeout=int(min(30.0, self.settings.order_timeout)))
        if self.settings.ca_file:
            # requests takes a CA bundle path where acme's type hint says bool.
            net.verify_ssl = self.settings.ca_file  # type: ignore[assignment]
        return net


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
