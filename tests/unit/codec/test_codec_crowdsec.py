"""The CrowdSec LAPI codec: Go durations, the decision stream (tolerant per decision, strict
about the envelope), and the alert a watcher posts."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeward.codec.crowdsec import (
    LapiError,
    ban_alert,
    format_go_duration,
    parse_go_duration,
    parse_stream,
)

# A real answer of crowdsec 1.4.6 (cscli decisions add --ip / --range, then delete).
REAL = (b'{"deleted":[{"duration":"-7.990019ms","id":1,"origin":"cscli","scenario":"manual \'ban\' from '
        b'\'tester\'","scope":"Ip","type":"ban","value":"127.0.0.5"}],"new":[{"duration":"3h59m59.292972625s",'
        b'"id":2,"origin":"cscli","scenario":"manual \'ban\' from \'tester\'","scope":"Range","type":"ban",'
        b'"value":"127.0.1.0/24"}]}')


def test_real_answer() -> None:
    b = parse_stream(REAL)
    assert [(d.id, d.scope, d.value) for d in b.deleted] == [(1, "Ip", "127.0.0.5")]
    assert b.deleted[0].duration < 0
    (d,) = b.new
    assert (d.type, d.scope, d.value, d.origin) == ("ban", "Range", "127.0.1.0/24", "cscli")
    assert d.scenario == "manual 'ban' from 'tester'"
    assert math.isclose(d.duration, 4 * 3600 - 0.707027375, abs_tol=1e-6)
    assert parse_stream(b'{"deleted":null,"new":null}').new == []


@pytest.mark.parametrize(("text", "seconds"), [
    ("4h", 14400.0), ("1m0s", 60.0), ("0s", 0.0), ("0", 0.0), ("-7.5ms", -0.0075), ("1.5µs", 1.5e-6),
    ("2h45m", 9900.0), ("300ms", 0.3), ("1h1m1.5s", 3661.5), ("10ns", 1e-8), (".5s", 0.5),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert math.isclose(parse_go_duration(text), seconds, abs_tol=1e-12)


@pytest.mark.parametrize("text", ["", "4", "h", "4x", "1h-2m", "--1s", "1 h", "1e3s", "s1", "9" * 70 + "s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(LapiError):
        parse_go_duration(text)


@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["h", "m", "s", "ms", "us", "ns"])),
                min_size=1, max_size=6), st.booleans())
def test_go_duration_parts_add_up(parts: list[tuple[int, str]], negative: bool) -> None:
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    text = ("-" if negative else "") + "".join(f"{n}{u}" for n, u in parts)
    want = sum(n * unit[u] for n, u in parts) * (-1 if negative else 1)
    assert math.isclose(parse_go_duration(text), want, rel_tol=1e-9, abs_tol=1e-9)


@given(st.floats(0, 10 * 365 * 86400.0))
def test_format_reads_back(seconds: float) -> None:
    assert math.isclose(parse_go_duration(format_go_duration(seconds)), round(seconds * 1000) / 1000,
                        abs_tol=1e-9)


def test_bad_decisions_are_counted_not_fatal() -> None:
    good = {"id": 3, "type": "ban", "scope": "ip", "value": "2001:DB8::1", "duration": "1h",
            "scenario": "x", "origin": "crowdsec"}
    body = json.dumps({"new": [
        good,
        {**good, "value": "not-an-ip"},
        {**good, "scope": "Range", "value": "10.0.0.0/33"},
        {**good, "duration": "forever"},
        {**good, "id": "7"},
        {**good, "scope": "Country", "value": "FR"},
        "nonsense",
        {**good, "scope": "range", "value": "10.1.2.3/8"},
        {**good, "scope": "Ip", "value": "127.0.8.0/24"},  # what `cscli decisions import` 1.4 files
    ], "deleted": None}).encode()
    b = parse_stream(body)
    assert [(d.scope, d.value) for d in b.new] == [("Ip", "2001:db8::1"), ("Range", "10.0.0.0/8"),
                                                   ("Range", "127.0.8.0/24")]
    assert b.invalid == 5 and b.other_scope == 1
    assert len(b.problems) == 5 and "not-an-ip" in b.problems[0]


@pytest.mark.parametrize("body", [b"", b"<html>", b"[]", b'{"new": {}}', b'{"new": 1}', b"\xff\xfe", b"null"])
def test_bad_envelopes_raise_lapi_error(body: bytes) -> None:
    with pytest.raises(LapiError):
        parse_stream(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
        ["id", "type", "scope", "value", "duration", "scenario", "origin", "new", "deleted"]), c, max_size=8),
    max_leaves=30)


@given(json_values)
def test_any_json_gives_a_batch_or_lapi_error(doc: object) -> None:
    try:
        b = parse_stream(json.dumps(doc).encode())
    except LapiError:
        return
    assert all(d.scope in ("Ip", "Range") for d in [*b.new, *b.deleted])


@given(st.binary(max_size=200))
def test_any_bytes_give_a_batch_or_lapi_error(body: bytes) -> None:
    try:
        parse_stream(body)
    except LapiError:
        pass


def test_ban_alert_shapes() -> None:
    a = ban_alert("192.0.2.9", scenario="edgeward/sshd", message="5 failures", start=0.0, duration=600)
    assert a["source"] == {"scope": "Ip", "value": "192.0.2.9", "ip": "192.0.2.9"}
    assert a["decisions"] == [{"duration": "600s", "origin": "crowdsec", "scenario": "edgeward/sshd",
                               "scope": "Ip", "type": "ban", "value": "192.0.2.9"}]
    assert a["start_at"] == "1970-01-01T00:00:00Z"
    r = ban_alert("10.0.0.0/8", scenario="s", message="m", start=0.0, duration=None)
    assert r["source"]["scope"] == "Range" and r["decisions"][0]["duration"] == "315360000s"
