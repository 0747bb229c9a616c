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


@dataclass(frozen=True)
class UdpResult:
    """The receiving side's (iperf3 server's) view of a UDP test: what crossed the proxy."""

    seconds: float  # the server's test window: ends when TEST_END arrives on the TCP control
    send_seconds: float  # the client's sending time
    blksize: int
    packets: int  # sequence numbers the server accounted for (received + lost)
    lost_packets: int
    lost_percent: float
    bytes_received: int
    target_bitrate: int  # 0: flat out (-b 0)

    @property
    def received_packets(self) -> int:
        return self.packets - self.lost_packets

    @property
    def packets_per_s(self) -> float:
        """Datagrams the server received, per second of sending.

        Per second of *sending*, not of the server's window: that window closes when
        the end-of-test message arrives over the TCP control connection, so a proxy
        that delays a small TCP segment (Nagle, delayed ACK: ~40 ms) would stretch it
        and seem to relay fewer datagrams/s although every one arrived.
        """
        seconds = self.send_seconds if self.send_seconds > 0 else self.seconds
        return self.received_packets / seconds if seconds > 0 else 0.0


def parse_iperf_udp_json(text: str) -> UdpResult:
    """From `iperf3 -c ... -u -J`: the server-side summary (`end.sum_received`,
    which iperf3 3.12 fills from the results the server sends back at the end)."""
    try:
        doc: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as e:
        raise IperfError(f"iperf3 output is not JSON: {text[:200]!r}") from e
    if "error" in doc:
        raise IperfError(f"iperf3: {doc['error']}")
    try:
        test = doc["start"]["test_start"]
        if test.get("protocol") != "UDP":
            raise IperfError(f"not a UDP test: protocol {test.get('protocol')!r}")
        received = doc["end"]["sum_received"]
        sent = doc["end"].get("sum_sent") or {}
        return UdpResult(
            seconds=float(received["seconds"]),
            send_seconds=float(sent.get("seconds", 0.0)),
            blksize=int(test["blksize"]),
            packets=int(received["packets"]),
            lost_packets=int(received["lost_packets"]),
            lost_percent=float(received["lost_percent"]),
            bytes_received=int(received["bytes"]),
            target_bitrate=int(test.get("target_bitrate", 0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise IperfError(f"iperf3 UDP JSON lacks {e}") from e
