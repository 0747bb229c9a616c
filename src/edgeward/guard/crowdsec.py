"""edgeward as a CrowdSec bouncer: a Local API's decisions enforced at admit like local bans.

The protocol is the one of CrowdSec's own stream bouncers (go-cs-bouncer): the first poll asks
``GET /v1/decisions/stream?startup=true`` (every decision in force, and the ended ones), the
next ones ``?startup=false`` (what changed since this bouncer's last successful poll, which the
LAPI remembers per API key), every `update_frequency`, with the key in ``X-Api-Key``. Deleted
decisions are applied before new ones (a decision deleted and re-added between two polls stays
in force), by value, as CrowdSec's bouncers do.

Decisions of type ban, scopes Ip and Range, go into the guard's `BanSet` under the jail
"crowdsec" with their end time; the scenario is the ban's reason in status, the bans list and
the dashboard. While the LAPI is down the last known decisions stay enforced (each still ends
at its own time); polls back off (doubling, up to `max_backoff`), errors are counted and
logged once per kind of failure, and the next successful poll brings what changed meanwhile.

Requests run on two threads of our own (one for the stream, one for alerts), with the
`requests` library the project already depends on: the event loop never waits for the LAPI.
A large first answer (a community blocklist: tens of thousands of decisions) is parsed on the
thread and applied in slices, yielding to the loop between them.

With machine credentials (`machine_id` + password), the guard's own bans are sent as alerts
(``POST /v1/watchers/login`` for a JWT, then ``POST /v1/alerts``), so the rest of a CrowdSec
setup sees them; unsent alerts wait in a bounded queue and are retried with the same back-off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from edgeward import __version__
from edgeward.codec.crowdsec import Decision, LapiError, StreamBatch, ban_alert, parse_stream
from edgeward.config.schema import CrowdSecSettings
from edgeward.guard.banset import BanSet, normalize_key
from edgeward.guard.build import CROWDSEC_JAIL, GuardError

log = logging.getLogger(__name__)

# Decisions applied to the ban set per slice before yielding to the event loop.
_SLICE = 500
# Alerts waiting for the LAPI; past this the oldest are dropped (and counted).
_MAX_PENDING_ALERTS = 1000
_ALERTS_PER_POST = 100
# A JWT is renewed this long before the LAPI says it expires.
_TOKEN_MARGIN = 60.0
# The largest decision stream read (a community blocklist of 100k decisions is ~20 MB): past it
# the answer is an error, not an unbounded allocation.
MAX_STREAM_BYTES = 128 * 1024 * 1024


class LapiUnavailable(Exception):
    """A request to the LAPI failed: `kind` names the failure for counting and logging once."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise GuardError(f"[guard.crowdsec] cannot read {what} from {path}: {e}") from None
    if not text:
        raise GuardError(f"[guard.crowdsec] {path} ({what}) is empty")
    return text


class LapiClient:
    """Blocking requests to one Local API (run on a worker thread, one session per thread)."""

    def __init__(self, settings: CrowdSecSettings, api_key: str | None, password: str | None) -> None:
        self.settings = settings
        self.base = settings.lapi_url
        self.api_key = api_key
        self.password = password
        self._token: str | None = None
        self._token_until = 0.0
        self._sessions: dict[str, requests.Session] = {}
        # Given with every request, not set on the sessions: requests lets REQUESTS_CA_BUNDLE or
        # CURL_CA_BUNDLE in the environment override a session's `verify` (psf/requests#3829).
        self._verify: bool | str = True
        if settings.insecure_skip_verify:
            self._verify = False
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            log.warning("crowdsec: insecure_skip_verify: the LAPI's certificate is not checked")
        elif settings.ca_cert_path is not None:
            self._verify = settings.ca_cert_path
        self._cert = (settings.cert_path, settings.key_path) if settings.cert_path and settings.key_path else None

    def _session(self, role: str) -> requests.Session:
        s = self._sessions.get(role)
        if s is None:
            s = requests.Session()
            s.headers["User-Agent"] = f"edgeward-bouncer/{__version__}"
            self._sessions[role] = s
        return s

    def _request(self, role: str, method: str, path: str, **kw: Any) -> requests.Response:
        try:
            return self._session(role).request(method, self.base + path, timeout=self.settings.timeout,
                                               verify=self._verify, cert=self._cert, **kw)
        except requests.exceptions.SSLError as e:
            raise LapiUnavailable("tls", f"TLS with the LAPI failed: {_short(e)}") from None
        except requests.exceptions.Timeout:
            raise LapiUnavailable("timeout", f"no answer within {self.settings.timeout:g}s") from None
        except requests.exceptions.ConnectionError as e:
            raise LapiUnavailable("connect", f"cannot reach the LAPI: {_short(e)}") from None
        except requests.exceptions.RequestException as e:
            raise LapiUnavailable("request", f"request failed: {e}") from None

    def stream(self, startup: bool) -> StreamBatch:
        """One poll of the decision stream, parsed (on this thread)."""
        cs = self.settings
        params = {"startup": "true" if startup else "false"}
        for key in ("origins", "scenarios_containing", "scenarios_not_containing"):
            values: list[str] = getattr(cs, key)
            if values:
                params[key] = ",".join(values)
        headers = {"X-Api-Key": self.api_key} if self.api_key is not None else {}
        r = self._request("stream", "GET", "v1/decisions/stream", params=params, headers=headers, stream=True)
        with r:
            if r.status_code in (401, 403):
                raise LapiUnavailable(
                    "auth", f"the LAPI refused the bouncer's credentials ({r.status_code} {_message(r)}): "
                    "check api_key / api_key_file (`cscli bouncers list`, `cscli bouncers add NAME`)")
            if r.status_code != 200:
                raise LapiUnavailable("http", f"the LAPI answered {r.status_code} {_message(r)}")
            body = bytearray()
            try:
                for chunk in r.iter_content(1 << 16):
                    body += chunk
                    if len(body) > MAX_STREAM_BYTES:
                        raise LapiUnavailable("protocol", f"decision stream larger than {MAX_STREAM_BYTES >> 20} MiB")
            except requests.exceptions.RequestException as e:
                raise LapiUnavailable("connect", f"the answer was cut: {_short(e)}") from None
        try:
            return parse_stream(bytes(body))
        except LapiError as e:
            raise LapiUnavailable("protocol", str(e)) from None

    def _login(self) -> str:
        cs = self.settings
        r = self._request("alerts", "POST", "v1/watchers/login",
                          json={"machine_id": cs.machine_id, "password": self.password, "scenarios": []})
        if r.status_code in (401, 403):
            raise LapiUnavailable(
                "login", f"the LAPI refused machine {cs.machine_id!r} ({r.status_code} {_message(r)}): check "
                "machine_id and password (`cscli machines list`; a new machine may need `cscli machines validate`)")
        if r.status_code != 200:
            raise LapiUnavailable("login", f"login answered {r.status_code} {_message(r)}")
        try:
            doc = r.json()
            token = doc["token"]
            assert isinstance(token, str) and token
        except (ValueError, KeyError, TypeError, AssertionError):
            raise LapiUnavailable("protocol", "login answer has no token") from None
        # The LAPI's tokens last an hour; renewing sooner than it says costs one request.
        self._token, self._token_until = token, time.monotonic() + 3600.0 - _TOKEN_MARGIN
        return token

    def push_alerts(self, alerts: list[dict[str, Any]]) -> list[str]:
        """Post alerts as the machine; returns the alert ids the LAPI gave."""
        for attempt in (1, 2):
            token = self._token if self._token is not None and time.monotonic() < self._token_until else None
            if token is None:
                token = self._login()
            r = self._request("alerts", "POST", "v1/alerts", json=alerts,
                              headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 401 and attempt == 1:
                self._token = None  # expired or the LAPI restarted with a new secret: log in again
                continue
            if r.status_code not in (200, 201):
                raise LapiUnavailable("alerts", f"posting alerts answered {r.status_code} {_message(r)}")
            try:
                ids = r.json()
            except ValueError:
                ids = []
            return [str(i) for i in ids] if isinstance(ids, list) else []
        raise LapiUnavailable("alerts", "posting alerts: unauthorized after a fresh login")

    def delete_decisions(self, params: dict[str, str]) -> int:
        """Delete (as the machine) the decisions matching `params`; returns how many."""
        for attempt in (1, 2):
            token = self._token if self._token is not None and time.monotonic() < self._token_until else None
            if token is None:
                token = self._login()
            r = self._request("alerts", "DELETE", "v1/decisions", params=params,
                              headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 401 and attempt == 1:
                self._token = None
                continue
            if r.status_code != 200:
                raise LapiUnavailable("alerts", f"deleting decisions answered {r.status_code} {_message(r)}")
            try:
                return int(r.json().get("nbDeleted", 0))
            except (ValueError, TypeError, AttributeError):
                return 0
        raise LapiUnavailable("alerts", "deleting decisions: unauthorized after a fresh login")

    def close(self) -> None:
        for s in self._sessions.values():
            s.close()
        self._sessions.clear()


def _message(r: requests.Response) -> str:
    """What an error answer says (its JSON "message", else its first bytes), read bounded."""
    try:
        raw = next(r.iter_content(4096), b"")
    except (requests.exceptions.RequestException, OSError):
        return "(unreadable answer)"
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    try:
        doc = json.loads(text)
    except ValueError:
        return repr(text[:200])
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return repr(doc["message"][:200])
    return repr(text[:200])


def _short(e: Exception) -> str:
    """The root of a requests/urllib3 connection error ("Connection refused"), not its wrappers."""
    root: BaseException = e
    while root.__context__ is not None or root.__cause__ is not None:
        nxt = root.__cause__ or root.__context__
        assert nxt is not None
        root = nxt
    text = str(root)
    return text.split("] ", 1)[-1] if text else type(root).__name__


@dataclass(slots=True)
class CrowdSecBan:
    """A decision in force at the edge."""

    key: str  # canonical address or network
    id: int
    scope: str
    scenario: str
    origin: str
    start: float  # when this edge got it
    until: float
    restored: bool = False  # from the snapshot, not (yet) confirmed by the LAPI

    def to_dict(self, now: float, refused: int) -> dict[str, Any]:
        return {
            "address": self.key,
            "jail": CROWDSEC_JAIL,
            "reason": self.scenario or f"CrowdSec decision {self.id}",
            "lines": [],
            "start": self.start,
            "end": self.until,
            "forever": False,
            "count": 1,
            "listeners": None,
            "remaining": max(0.0, self.until - now),
            "refused": refused,
            "origin": self.origin,
            "scope": self.scope,
            "decision_id": self.id,
        }


class CrowdSecBouncer:
    """Polls the LAPI and keeps the ban set's "crowdsec" jail equal to its ban decisions.

    `on_change` is called after decisions with an end time were added (the guard schedules
    its expiry sweep there)."""

    def __init__(self, settings: CrowdSecSettings, banset: BanSet, *, clock: Callable[[], float] = time.time,
                 on_change: Callable[[], None] | None = None, snapshot: str | None = None,
                 ignore: Iterable[str] = ()) -> None:
        """`snapshot`: a file where the decisions in force are kept, so that an edge restarted while
        the LAPI is down still enforces them (None: memory only). `ignore`: the guard's ignoreip,
        addresses and networks no decision bans (a range that overlaps one is not enforced)."""
        self.settings = settings
        self._ignore: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in ignore:
            key = normalize_key(item)
            if key is not None:
                self._ignore.append(ipaddress.ip_network(key))
        self.ignored = 0
        self.snapshot_path = snapshot
        self.restored = 0
        self.snapshot_errors = 0
        self.banset = banset
        self._clock = clock
        self._on_change = on_change
        self.decisions: dict[str, CrowdSecBan] = {}
        api_key = settings.api_key.strip() if settings.api_key is not None else (
            _read_secret(settings.api_key_file, "the API key") if settings.api_key_file is not None else None)
        password = settings.password if settings.password is not None else (
            _read_secret(settings.password_file, "the machine password")
            if settings.password_file is not None else None)
        self.client = LapiClient(settings, api_key, password)
        self.push_alerts = settings.machine_id is not None
        self._pool: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._first_poll: asyncio.Event | None = None
        # Jobs for the LAPI as the machine, in order: ("alert", alert) or ("delete", query).
        self._alerts: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._alerts_ready: asyncio.Event | None = None
        # what status shows
        self.polls = 0
        self.errors = 0
        self.errors_by_kind: dict[str, int] = {}
        self.last_error: str | None = None
        self.last_poll: float | None = None  # epoch of the last successful poll
        self.failing_since: float | None = None
        self.invalid = 0
        self.other_scope = 0
        self.other_type = 0
        self.added = 0
        self.deleted = 0
        self.alerts_sent = 0
        self.decisions_withdrawn = 0
        self.alerts_dropped = 0
        self.alert_errors = 0
        self.last_alert_error: str | None = None
        self._startup = True

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Start polling; returns after the first poll (applied) or after `timeout`, whichever
        comes first, so the edge starts with the LAPI's decisions when it can, and starts anyway."""
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgeward-crowdsec")
        self._restore()
        self._first_poll = asyncio.Event()
        self._alerts_ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._poll_loop()))
        if self.push_alerts:
            self._tasks.append(loop.create_task(self._alert_loop()))
        log.info("crowdsec: bouncer of %s (every %gs)%s", self.settings.lapi_url, self.settings.update_frequency,
                 f", alerts as machine {self.settings.machine_id!r}" if self.push_alerts else "")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_poll.wait(), self.settings.timeout + 0.5)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._pool is not None:
            # A request in flight ends by its own timeout; nothing waits for it here.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.client.close()

    # -- the snapshot -----------------------------------------------------------------

    def _restore(self) -> None:
        """The decisions of the last run that have not ended, enforced until the LAPI says otherwise
        (the first successful poll lifts those it no longer has)."""
        path = self.snapshot_path
        if path is None or not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            items = doc["decisions"]
            assert isinstance(items, list)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            self.snapshot_errors += 1
            log.error("crowdsec: the snapshot %s is unreadable (%s); starting without it", path, e)
            return
        if doc.get("lapi_url") != self.settings.lapi_url:
            log.info("crowdsec: the snapshot %s is of another LAPI (%s): not restored", path, doc.get("lapi_url"))
            return
        now = self._clock()
        for it in items:
            try:
                key = normalize_key(str(it["key"]))
                until = float(it["until"])
                ban = CrowdSecBan(str(key), int(it["id"]), str(it["scope"]), str(it["scenario"])[:1024],
                                  str(it["origin"])[:1024], float(it["start"]), until, restored=True)
            except (KeyError, TypeError, ValueError):
                self.snapshot_errors += 1
                continue
            if key is None or until <= now or (self._ignore and self._ignored(key)):
                continue
            self.decisions[key] = ban
            self.banset.add(key, jail=CROWDSEC_JAIL, until=until)
            self.restored += 1
        if self.restored:
            log.warning("crowdsec: %d decision(s) of the last run enforced until the LAPI answers", self.restored)
            if self._on_change is not None:
                self._on_change()

    def _save(self) -> None:
        """Write the snapshot on the worker thread (atomically: a new file renamed over the old)."""
        path = self.snapshot_path
        if path is None or self._pool is None:
            return
        rows = [{"key": b.key, "id": b.id, "scope": b.scope, "scenario": b.scenario, "origin": b.origin,
                 "start": b.start, "until": b.until} for b in self.decisions.values()]

        def write() -> None:
            tmp = f"{path}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump({"lapi_url": self.settings.lapi_url, "decisions": rows}, f)
                os.replace(tmp, path)
            except OSError as e:
                self.snapshot_errors += 1
                log.error("crowdsec: cannot write the snapshot %s: %s", path, e)

        self._pool.submit(write)

    # -- the decision stream --------------------------------------------------------

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        cs = self.settings
        failures = 0
        last_kind: str | None = None
        while True:
            startup = self._startup
            try:
                try:
                    batch = await loop.run_in_executor(self._pool, self.client.stream, startup)
                except LapiUnavailable:
                    raise
                except Exception as exc:  # a bug here must not end the polling: said, counted, retried
                    log.exception("crowdsec: poll failed unexpectedly")
                    raise LapiUnavailable("internal", f"poll failed: {exc!r}") from None
            except LapiUnavailable as e:
                failures += 1
                self._count_error(e)
                # Said once per kind of failure; repeats are counted (status) and logged at debug.
                level = logging.ERROR if e.kind != last_kind else logging.DEBUG
                log.log(level, "crowdsec: %s (%s); %d decision(s) stay enforced, retrying with back-off",
                        e, cs.lapi_url, len(self.decisions))
                last_kind = e.kind
                if self.failing_since is None:
                    self.failing_since = self._clock()
                delay = min(cs.max_backoff, cs.update_frequency * 2.0 ** min(failures - 1, 30))
            else:
                if failures:
                    log.warning("crowdsec: the LAPI answers again after %d failed poll(s)", failures)
                failures, last_kind, self.failing_since = 0, None, None
                try:
                    await self._apply(batch, startup)
                except Exception as exc:
                    log.exception("crowdsec: applying decisions failed")
                    self._count_error(LapiUnavailable("internal", f"applying decisions failed: {exc!r}"))
                self._startup = False
                self.polls += 1
                self.last_poll = self._clock()
                delay = cs.update_frequency
            if self._first_poll is not None and not self._first_poll.is_set():
                self._first_poll.set()
            await asyncio.sleep(delay)

    def _count_error(self, e: LapiUnavailable) -> None:
        self.errors += 1
        self.errors_by_kind[e.kind] = self.errors_by_kind.get(e.kind, 0) + 1
        self.last_error = str(e)

    async def _apply(self, batch: StreamBatch, startup: bool) -> None:
        """Deleted decisions first, then new ones, in slices that yield to the loop."""
        if batch.invalid:
            self.invalid += batch.invalid
            log.warning("crowdsec: %d malformed decision(s) skipped: %s", batch.invalid, "; ".join(batch.problems))
        self.other_scope += batch.other_scope
        banset = self.banset
        for i, d in enumerate(batch.deleted):
            if d.type == "ban":
                self._lift(d)
            if i % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)
        now = self._clock()
        added = 0
        for i, d in enumerate(batch.new):
            if d.type != "ban":
                self.other_type += 1  # captcha, throttle...: nothing the edge can do at admit
            elif d.duration > 0:
                key = normalize_key(d.value)
                if key is not None and self._ignore and self._ignored(key):
                    self.ignored += 1
                elif key is not None:
                    ban = CrowdSecBan(key, d.id, d.scope, d.scenario, d.origin, now, now + d.duration)
                    self.decisions[key] = ban
                    banset.add(key, jail=CROWDSEC_JAIL, until=ban.until)
                    added += 1
            if i % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)
        self.added += added
        if startup:
            # The first answer is the LAPI's whole state: what the snapshot had and the LAPI no
            # longer has was deleted while this edge was away.
            gone = [k for k, b in self.decisions.items() if b.restored]
            for k in gone:
                del self.decisions[k]
                self.banset.remove(k, jail=CROWDSEC_JAIL)
            if gone:
                log.info("crowdsec: %d decision(s) of the last run are no longer in the LAPI: lifted", len(gone))
        if added or batch.deleted or startup:
            log.info("crowdsec: %d decision(s) added, %d deleted%s; %d in force", added, len(batch.deleted),
                     " (startup)" if startup else "", len(self.decisions))
        if added and self._on_change is not None:
            self._on_change()
        self._prune(now)
        if added or batch.deleted or startup:
            self._save()

    def _ignored(self, key: str) -> bool:
        """True if the decision's address or range touches guard.ignoreip (never refused)."""
        net = ipaddress.ip_network(key)
        for ign in self._ignore:
            if net.version == ign.version and net.overlaps(ign):  # type: ignore[arg-type]
                if "/" in key:
                    log.warning("crowdsec: decision for %s not enforced: it covers ignoreip %s", key, ign)
                return True
        return False

    def _lift(self, d: Decision) -> None:
        key = normalize_key(d.value)
        if key is None or self.decisions.pop(key, None) is None:
            return
        self.deleted += 1
        self.banset.remove(key, jail=CROWDSEC_JAIL)

    def _prune(self, now: float) -> None:
        """Forget decisions that have ended (the guard's sweep lifted them from the ban set)."""
        ended = [k for k, b in self.decisions.items() if b.until <= now]
        for k in ended:
            del self.decisions[k]

    # -- alerts ---------------------------------------------------------------------

    def report_ban(self, address: str, jail: str, reason: str, start: float, end: float | None,
                   failures: int = 1) -> None:
        """Queue an alert for a ban this node made (no-op without machine credentials)."""
        if not self.push_alerts or jail == CROWDSEC_JAIL:
            return
        try:
            alert = ban_alert(address, scenario=f"edgeward/{jail}", message=reason[:1000] or f"banned by {jail}",
                              start=start, duration=None if end is None else end - start,
                              origin=self.settings.alert_origin, events_count=failures)
        except ValueError:
            return
        self._queue("alert", alert)

    def report_unban(self, address: str, jail: str) -> None:
        """Withdraw the decisions this node's alerts made for a ban an admin lifted here, so that
        the LAPI (and this bouncer, which sees its own decisions come back) lifts it too."""
        if not self.push_alerts or jail == CROWDSEC_JAIL:
            return
        self._queue("delete", {"value": address, "scenario": f"edgeward/{jail}"})

    def _queue(self, kind: str, job: dict[str, Any]) -> None:
        if len(self._alerts) >= _MAX_PENDING_ALERTS:
            self._alerts.popleft()
            self.alerts_dropped += 1
        self._alerts.append((kind, job))
        if self._alerts_ready is not None:
            self._alerts_ready.set()

    async def _alert_loop(self) -> None:
        assert self._alerts_ready is not None
        loop = asyncio.get_running_loop()
        cs = self.settings
        failures = 0
        last_kind: str | None = None
        while True:
            await self._alerts_ready.wait()
            self._alerts_ready.clear()
            while self._alerts:
                # Taken out while in flight (so overflow drops only jobs not yet tried), put back
                # in front if the LAPI fails.
                kind, first = self._alerts.popleft()
                jobs = [(kind, first)]
                if kind == "alert":  # consecutive alerts go in one request
                    while self._alerts and self._alerts[0][0] == "alert" and len(jobs) < _ALERTS_PER_POST:
                        jobs.append(self._alerts.popleft())
                try:
                    try:
                        if kind == "delete":
                            n = await loop.run_in_executor(self._pool, self.client.delete_decisions, first)
                        else:
                            await loop.run_in_executor(self._pool, self.client.push_alerts, [j for _, j in jobs])
                    except LapiUnavailable:
                        raise
                    except Exception as exc:  # a bug must not end the sending: said, counted, retried
                        log.exception("crowdsec: sending to the LAPI failed unexpectedly")
                        raise LapiUnavailable("internal", f"sending failed: {exc!r}") from None
                except LapiUnavailable as e:
                    failures += 1
                    self.alert_errors += 1
                    self.last_alert_error = str(e)
                    room = _MAX_PENDING_ALERTS - len(self._alerts)
                    self.alerts_dropped += max(0, len(jobs) - room)
                    self._alerts.extendleft(reversed(jobs[:max(0, room)]))
                    log.log(logging.ERROR if e.kind != last_kind else logging.DEBUG,
                            "crowdsec: alerts not sent (%d waiting): %s", len(self._alerts), e)
                    last_kind = e.kind
                    await asyncio.sleep(min(cs.max_backoff, cs.update_frequency * 2.0 ** min(failures - 1, 30)))
                    continue
                if failures:
                    log.warning("crowdsec: alerts go through again")
                failures, last_kind = 0, None
                if kind == "delete":
                    self.decisions_withdrawn += n
                    log.info("crowdsec: withdrew %d decision(s) of %s (%s) from the LAPI", n, first["value"],
                             first["scenario"])
                else:
                    self.alerts_sent += len(jobs)
                    log.info("crowdsec: sent %d alert(s) to the LAPI", len(jobs))

    # -- views ----------------------------------------------------------------------

    def bans(self, now: float | None = None) -> list[dict[str, Any]]:
        now = self._clock() if now is None else now
        return [b.to_dict(now, self.banset.refused(b.key)) for b in self.decisions.values() if b.until > now]

    def newest_bans(self, n: int, now: float) -> list[dict[str, Any]]:
        """The newest `n` decisions in force, newest first (only those `n` become dicts)."""
        live = (b for b in self.decisions.values() if b.until > now)
        return [b.to_dict(now, self.banset.refused(b.key)) for b in heapq.nlargest(n, live, key=lambda b: b.start)]

    def in_force(self, now: float) -> int:
        return sum(1 for b in self.decisions.values() if b.until > now)

    def status(self, with_bans: bool = False) -> dict[str, Any]:
        now = self._clock()
        active = [b for b in self.decisions.values() if b.until > now]
        out: dict[str, Any] = {
            "lapi_url": self.settings.lapi_url,
            "update_frequency": self.settings.update_frequency,
            "decisions": len(active),
            "ranges": sum(1 for b in active if "/" in b.key),
            "polls": self.polls,
            "last_poll": self.last_poll,
            "connected": self.failing_since is None and self.last_poll is not None,
            "failing_since": self.failing_since,
            "errors": self.errors,
            "errors_by_kind": dict(self.errors_by_kind),
            "last_error": self.last_error,
            "added": self.added,
            "deleted": self.deleted,
            "invalid": self.invalid,
            "other_scope": self.other_scope,
            "other_type": self.other_type,
            "refused": self.banset.refused_by_jail.get(CROWDSEC_JAIL, 0),
            "restored": self.restored,
            "ignored": self.ignored,
            "snapshot_errors": self.snapshot_errors,
            "alerts": None if not self.push_alerts else {
                "machine_id": self.settings.machine_id,
                "sent": self.alerts_sent,
                "withdrawn": self.decisions_withdrawn,
                "pending": len(self._alerts),
                "dropped": self.alerts_dropped,
                "errors": self.alert_errors,
                "last_error": self.last_alert_error,
            },
        }
        if with_bans:
            out["bans"] = [b.to_dict(now, self.banset.refused(b.key)) for b in active]
        else:
            recent = sorted(active, key=lambda b: -b.start)[:10]
            out["recent"] = [{"address": b.key, "reason": b.scenario, "origin": b.origin, "end": b.until}
                             for b in recent]
        return out
