"""Reading iperf3 -J output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class IperfError(RuntimeError):
    pass


@dataclass(frozen=True)
class IperfResult:
    streams: int
    seconds: float
    bytes_received: int
    bits_per_second: float
    retransmits: int | None

    @property
    def gbit_per_s(self) -> float:
        return self.bits_per_second / 1e9


def parse_iperf_json(text: str) -> IperfResult:
    """Throughput as the receiver saw it (what crossed the proxy), from iperf3 -J.

    iperf3 reports failures inside its JSON ("error"), with exit status 1;
    that becomes an IperfError carrying iperf3's own message.
    """
    try:
        doc: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as e:
        raise IperfError(f"iperf3 output is not JSON: {text[:200]!r}") from e
    if "error" in doc:
        raise IperfError(f"iperf3: {doc['error']}")
    try:
        end = doc["end"]
        received = end["sum_received"]
        sent = end.get("sum_sent", {})
        streams = int(doc["start"]["test_start"]["num_streams"])
    except (KeyError, TypeError) as e:
        raise IperfError(f"iperf3 JSON lacks {e}") from e
    return IperfResult(
        streams=streams,
        seconds=float(received["seconds"]),
        bytes_received=int(received["bytes"]),
        bits_per_second=float(received["bits_per_second"]),
        retransmits=sent.get("retransmits"),
    )
