"""iperf3 -J parsing, against real iperf3 3.12 output captured on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench.iperf import IperfError, parse_iperf_json

FIXTURES = Path(__file__).parent / "fixtures"


def test_one_stream() -> None:
    text = (FIXTURES / "iperf3_p1.json").read_text()
    doc = json.loads(text)
    r = parse_iperf_json(text)
    assert r.streams == 1
    assert r.bytes_received == doc["end"]["sum_received"]["bytes"]
    assert r.bits_per_second == doc["end"]["sum_received"]["bits_per_second"]
    assert r.gbit_per_s == pytest.approx(r.bits_per_second / 1e9)
    assert r.seconds > 0


def test_two_streams_sum() -> None:
    text = (FIXTURES / "iperf3_p2.json").read_text()
    r = parse_iperf_json(text)
    assert r.streams == 2
    per_stream = json.loads(text)["end"]["streams"]
    assert r.bytes_received == sum(s["receiver"]["bytes"] for s in per_stream)
    assert r.retransmits is not None


def test_iperf_error_is_reported() -> None:
    err = json.dumps(
        {
            "start": {},
            "intervals": [],
            "end": {},
            "error": "error - the server is busy running a test. try again later",
        }
    )
    with pytest.raises(IperfError, match="busy"):
        parse_iperf_json(err)


@pytest.mark.parametrize("text", ["", "iperf3: error - unable to connect", "{}"])
def test_garbage_is_an_iperf_error(text: str) -> None:
    with pytest.raises(IperfError):
        parse_iperf_json(text)
