"""wrk (Debian's wrk 4.1): the command lines of the HTTP cases and a parser for its
text report.

The report is parsed rather than a Lua `done()` hook used: it is what wrk prints
for anyone, and a script would be one more thing that differs between wrk
builds. wrk rounds to three significant digits (`5.00ms`), plenty for medians.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class WrkError(ValueError):
    pass


# wrk's units (src/units.c): times scale by 1000 up to seconds, then by 60.
_TIME_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_BYTES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "PB": 1 << 50}

_REQUESTS = re.compile(
    r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+)(B|KB|MB|GB|TB|PB) read\s*$", re.M
)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)\s*$", re.M)
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_SOCKET_ERRORS = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$", re.M
)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses: (\d+)\s*$", re.M)
_THREADS = re.compile(r"^\s*(\d+) threads and (\d+) connections\s*$", re.M)


@dataclass(frozen=True)
class WrkResult:
    requests: int  # responses read (any status)
    seconds: float
    bytes_read: int
    requests_per_s: float  # wrk's own figure: requests / seconds
    latency_ms: dict[str, float]  # "p50", "p75", "p90", "p99" (with --latency)
    errors: dict[str, int] = field(default_factory=dict)  # connect/read/write/timeout/status
    connections: int = 0

    @property
    def non_2xx(self) -> int:
        return self.errors.get("status", 0)

    @property
    def socket_errors(self) -> int:
        return sum(v for k, v in self.errors.items() if k != "status")

    @property
    def ok_per_s(self) -> float:
        """Responses with a 2xx/3xx status per second: a proxy that answers 502 fast
        must not look fast."""
        return (self.requests - self.non_2xx) / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "seconds": self.seconds,
            "bytes_read": self.bytes_read,
            "requests_per_s": self.requests_per_s,
            "latency_ms": self.latency_ms,
            "errors": self.errors,
            "connections": self.connections,
        }


def parse_wrk(text: str) -> WrkResult:
    """The numbers of one wrk report; WrkError when it is not one (e.g. `unable to
    connect`, which wrk prints instead of a report when the first connect fails)."""
    m = _REQUESTS.search(text)
    rate = _RATE.search(text)
    if m is None or rate is None:
        tail = " | ".join(text.strip().splitlines()[-3:]) or "no output"
        raise WrkError(f"not a wrk report: {tail}")
    seconds = float(m.group(2)) * _TIME_MS[m.group(3)] / 1e3
    latency = {f"p{p}": float(v) * _TIME_MS[unit] for p, v, unit in _PERCENTILE.findall(text)}
    errors: dict[str, int] = {}
    se = _SOCKET_ERRORS.search(text)
    if se:
        for name, value in zip(("connect", "read", "write", "timeout"), se.groups(), strict=True):
            errors[name] = int(value)
    n2 = _NON_2XX.search(text)
    if n2:
        errors["status"] = int(n2.group(1))
    threads = _THREADS.search(text)
    return WrkResult(
        requests=int(m.group(1)),
        seconds=seconds,
        bytes_read=round(float(m.group(4)) * _BYTES[m.group(5)]),
        requests_per_s=float(rate.group(1)),
        latency_ms=latency,
        errors=errors,
        connections=int(threads.group(2)) if threads else 0,
    )


def wrk_argv(
    url: str,
    seconds: int,
    connections: int = 50,
    close: bool = False,
    timeout_s: int = 10,
) -> list[str]:
    """One wrk thread (the client has one CPU when pinned), `connections` keep-alive
    connections, latency percentiles. `close`: every request asks for
    `Connection: close`, so each one pays a new connection (and handshake) and wrk
    reconnects right after each response. A timeout well above any latency seen
    (wrk's default is 2 s): a timed-out request is left out of wrk's latency
    histogram, which would flatter p99."""
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        f"{timeout_s}s",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, url]
