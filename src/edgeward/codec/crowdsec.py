"""The CrowdSec Local API's messages, sans I/O: the decision stream in, alerts out.

A bouncer polls ``GET /v1/decisions/stream`` and gets ``{"new": [...], "deleted": [...]}``
(either may be null), each decision like
``{"id": 7, "origin": "cscli", "scenario": "crowdsecurity/ssh-bf", "scope": "Ip",
"type": "ban", "value": "192.0.2.1", "duration": "3h59m58.9s"}``; the duration is Go's
``time.Duration.String()`` (negative for a decision that has ended). `parse_stream` turns
the body into typed decisions; one bad decision is counted and skipped, never the batch.
`ban_alert` builds the alert a watcher (machine) posts to ``/v1/alerts`` for one ban.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import CodecError

__all__ = [
    "Decision",
    "LapiError",
    "StreamBatch",
    "ban_alert",
    "format_go_duration",
    "parse_go_duration",
    "parse_stream",
]

# The scopes a bouncer at the edge can enforce, as the LAPI spells them (it accepts any case).
SCOPES = {"ip": "Ip", "range": "Range"}
# Bounds: a stream body is parsed whole (the LAPI does not page), but a decision's strings
# are short; anything longer is malformed, not a decision.
_MAX_TEXT = 1024
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
# A ban "forever" sent to the LAPI: it needs a duration; ten years outlives any edge.
FOREVER = 10 * 365 * 86400.0


class LapiError(CodecError):
    """A Local API answer that is not what the protocol says (not JSON, wrong shape)."""


def parse_go_duration(text: str) -> float:
    """Seconds from a Go duration string ("4h", "3h59m58.9s", "-7.9ms", "0s")."""
    if not isinstance(text, str) or not text or len(text) > 64:
        raise LapiError(f"invalid duration {text!r}")
    s = text
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _GO_PART.match(s, pos)
        if m is None:
            raise LapiError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise LapiError(f"invalid duration {text!r}")
    return sign * total


def format_go_duration(seconds: float) -> str:
    """A Go duration string Go's ParseDuration reads back ("3600s", "0.25s")."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite duration: {seconds!r}")
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision of the stream; `value` is checked for its scope (an address, a network)."""

    id: int
    type: str  # "ban", "captcha", ...: the edge enforces "ban" only
    scope: str  # "Ip" or "Range" (other scopes are skipped as unknown)
    value: str
    scenario: str
    origin: str
    duration: float  # seconds left when the LAPI answered; <= 0: ended


@dataclass(slots=True)
class StreamBatch:
    """One answer of the stream: decisions to lift, decisions to enforce, and what was skipped."""

    new: list[Decision] = field(default_factory=list)
    deleted: list[Decision] = field(default_factory=list)
    invalid: int = 0  # malformed decisions skipped
    other_scope: int = 0  # scopes the edge cannot enforce (Country, AS, Username...)
    problems: list[str] = field(default_factory=list)  # the first few reasons, for the log


def _text(d: dict[str, Any], key: str, *, required: bool = True) -> str:
    v = d.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or len(v) > _MAX_TEXT:
        raise LapiError(f"decision field {key!r} is {type(v).__name__}, not a short string")
    return v


def parse_decision(d: object) -> Decision | None:
    """A decision, or None for a scope the edge cannot enforce. Raises LapiError if malformed."""
    if not isinstance(d, dict):
        raise LapiError(f"decision is {type(d).__name__}, not an object")
    raw_id = d.get("id", 0)
    if isinstance(raw_id, bool) or not isinstance(raw_id, int):
        raise LapiError(f"decision id is {raw_id!r}, not an integer")
    scope = SCOPES.get(_text(d, "scope").lower())
    value = _text(d, "value").strip()
    if scope is None:
        return None
    if scope == "Ip" and "/" in value:
        # `cscli decisions import` (1.4) files a CSV's ranges under scope Ip; the LAPI stores their
        # bounds like a Range's, so they are one.
        scope = "Range"
    try:
        if scope == "Ip":
            value = str(ipaddress.ip_address(value))
        else:
            value = str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise LapiError(f"decision value {value!r} is not an {'address' if scope == 'Ip' else 'IP range'}") from None
    return Decision(
        id=raw_id,
        type=_text(d, "type").lower(),
        scope=scope,
        value=value,
        scenario=_text(d, "scenario", required=False),
        origin=_text(d, "origin", required=False),
        duration=parse_go_duration(_text(d, "duration")),
    )


def parse_stream(body: bytes) -> StreamBatch:
    """The decisions of one ``/v1/decisions/stream`` answer. Raises LapiError if the body is not
    the stream's JSON object; a malformed decision is counted in `invalid` and skipped."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise LapiError(f"decision stream is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise LapiError(f"decision stream is {type(doc).__name__}, not an object")
    batch = StreamBatch()
    for key, out in (("deleted", batch.deleted), ("new", batch.new)):
        items = doc.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            raise LapiError(f"decision stream's {key!r} is {type(items).__name__}, not a list")
        for item in items:
            try:
                dec = parse_decision(item)
            except LapiError as e:
                batch.invalid += 1
                if len(batch.problems) < 5:
                    batch.problems.append(str(e))
                continue
            if dec is None:
                batch.other_scope += 1
            else:
                out.append(dec)
    return batch


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def ban_alert(
    address: str,
    *,
    scenario: str,
    message: str,
    start: float,
    duration: float | None,
    origin: str = "crowdsec",
    events_count: int = 1,
) -> dict[str, Any]:
    """The alert (with its one ban decision) a watcher posts for a ban of `address`
    (an IP address or a network) lasting `duration` seconds (None: forever)."""
    net = ipaddress.ip_network(address, strict=False)
    single = net.prefixlen == net.max_prefixlen
    value = str(net.network_address) if single else str(net)
    scope = "Ip" if single else "Range"
    dur = format_go_duration(FOREVER if duration is None or duration < 0 else max(duration, 1.0))
    at = _rfc3339(start)
    return {
        "scenario": scenario,
        "scenario_hash": "",
        "scenario_version": "",
        "message": message,
        "events_count": max(1, events_count),
        "events": [],
        "start_at": at,
        "stop_at": at,
        "capacity": 0,
        "leakspeed": "0",
        "simulated": False,
        "source": {"scope": scope, "value": value, **({"ip": value} if single else {"range": value})},
        "decisions": [{
            "duration": dur, "origin": origin, "scenario": scenario, "scope": scope,
            "type": "ban", "value": value,
        }],
    }
