"""The handoff record and acknowledgement (codec/handoff.py, docs/handoff-protocol.md)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeward.codec import NEED_MORE, CodecError
from edgeward.codec.handoff import (
    MAX_RECORD,
    Ack,
    HandoffError,
    HandoffRecord,
    build_ack,
    build_record,
    parse_ack,
    parse_record,
)


def record(data: bytes) -> HandoffRecord:
    r = parse_record(data)
    assert isinstance(r, HandoffRecord)
    return r


def test_documented_example_bytes() -> None:
    """The worked example of docs/handoff-protocol.md, byte for byte."""
    rec = HandoffRecord(service="web", client=("192.0.2.7", 51234), listener=("198.51.100.1", 443),
                        protocol="tls", name="a.example.org", alpn=("h2", "http/1.1"))
    wire = build_record(rec)
    expected = bytes.fromhex(
        "4557484f" "01" "00" "003e"              # magic, version 1, flags, body length 62
        "010003" "776562"                        # service "web"
        "020006" "c0000207" "c822"               # client 192.0.2.7:51234
        "030006" "c6336401" "01bb"               # listener 198.51.100.1:443
        "040003" "746c73"                        # protocol "tls"
        "05000d" + b"a.example.org".hex() +      # name
        "060002" "6832"                          # ALPN "h2"
        "060008" + b"http/1.1".hex()             # ALPN "http/1.1"
    )
    assert wire == expected
    assert record(wire) == rec
    assert record(wire).length == len(wire)


def test_ipv6_proxy_flag_id_and_listener_name() -> None:
    rec = HandoffRecord(service="chat", client=("2001:db8::5", 1), listener=("::1", 5223), via_proxy=True,
                        listener_name="tls", handoff_id=2**64 - 1)
    back = record(build_record(rec))
    assert back == rec and back.via_proxy


def test_ipv4_mapped_client_reads_as_ipv4() -> None:
    assert record(build_record(HandoffRecord("s", ("::ffff:192.0.2.1", 9)))).client == ("192.0.2.1", 9)


def test_every_prefix_needs_more_and_extra_bytes_are_not_consumed() -> None:
    wire = build_record(HandoffRecord("svc", ("192.0.2.1", 80), name="x.example"))
    for i in range(len(wire)):
        assert parse_record(wire[:i]) is NEED_MORE
    assert record(wire + b"trailing").length == len(wire)


def test_unknown_tlv_is_skipped() -> None:
    wire = build_record(HandoffRecord("svc", ("192.0.2.1", 80)))
    body = wire[8:] + struct.pack("!BH", 0xE0, 3) + b"new"
    again = wire[:6] + struct.pack("!H", len(body)) + body
    assert record(again) == HandoffRecord("svc", ("192.0.2.1", 80))


@pytest.mark.parametrize("mutate, message", [
    (lambda w: b"XWHO" + w[4:], "magic"),
    (lambda w: w[:4] + b"\x02" + w[5:], "version"),
    (lambda w: w[:5] + b"\x80" + w[6:], "flags"),
    (lambda w: w[:6] + b"\xff\xff" + w[8:], "exceeds"),
    (lambda w: w + struct.pack("!BH", 1, 3) + b"dup", "twice"),
    (lambda w: w[:8] + struct.pack("!BH", 2, 6) + bytes(6) + w[8:], "twice"),
])
def test_malformed(mutate: object, message: str) -> None:
    wire = build_record(HandoffRecord("svc", ("192.0.2.1", 80)))
    bad = mutate(wire)  # type: ignore[operator]
    if bad[6:8] == wire[6:8] and len(bad) > len(wire):  # appended TLVs: fix the body length
        bad = bad[:6] + struct.pack("!H", len(bad) - 8) + bad[8:]
    with pytest.raises(HandoffError, match=message):
        parse_record(bad)


def test_required_fields_and_bad_values() -> None:
    def body(*tlvs: bytes) -> bytes:
        b = b"".join(tlvs)
        return b"EWHO\x01\x00" + struct.pack("!H", len(b)) + b

    def tlv(t: int, v: bytes) -> bytes:
        return struct.pack("!BH", t, len(v)) + v

    with pytest.raises(HandoffError, match="without service"):
        parse_record(body(tlv(1, b"svc")))
    with pytest.raises(HandoffError, match="address of 5 bytes"):
        parse_record(body(tlv(1, b"svc"), tlv(2, b"12345")))
    with pytest.raises(HandoffError, match="not utf-8"):
        parse_record(body(tlv(1, b"\xff"), tlv(2, bytes(6))))
    with pytest.raises(HandoffError, match="1 to 255"):
        parse_record(body(tlv(1, b""), tlv(2, bytes(6))))
    with pytest.raises(HandoffError, match="overruns"):
        parse_record(body(tlv(1, b"svc"), struct.pack("!BH", 2, 60)))
    with pytest.raises(HandoffError, match="8 bytes"):
        parse_record(body(tlv(1, b"s"), tlv(2, bytes(6)), tlv(8, b"\x01")))


def test_builder_refuses_what_the_format_cannot_carry() -> None:
    with pytest.raises(HandoffError):
        build_record(HandoffRecord("", ("192.0.2.1", 1)))
    with pytest.raises(HandoffError):
        build_record(HandoffRecord("s", ("not-an-ip", 1)))
    with pytest.raises(HandoffError):
        build_record(HandoffRecord("s", ("192.0.2.1", 70000)))
    with pytest.raises(HandoffError):
        build_record(HandoffRecord("s", ("192.0.2.1", 1), alpn=tuple("x" * 200 for _ in range(30))))


def test_ack() -> None:
    assert parse_ack(b"") is NEED_MORE
    assert parse_ack(build_ack(Ack.ACCEPTED)) is Ack.ACCEPTED
    assert parse_ack(b"\x01") is Ack.BUSY
    assert parse_ack(b"\xfe") is Ack.REFUSED  # unassigned codes are refusals


# ---------------------------------------------------------------------- properties
_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda s: 0 < len(s.encode()) <= 255)
_ip = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)).map(str)
_addr = st.tuples(_ip, st.integers(0, 65535))
_records = st.builds(
    HandoffRecord,
    service=_text, client=_addr, listener=st.none() | _addr,
    protocol=st.none() | st.sampled_from(["tls", "http", "xmpp", "ssh", "unknown"]),
    name=st.none() | _text,
    alpn=st.lists(st.binary(min_size=1, max_size=20).map(lambda b: b.decode("latin-1")), max_size=5).map(tuple),
    listener_name=st.just("") | _text, via_proxy=st.booleans(), handoff_id=st.integers(0, 2**64 - 1),
)


@given(_records)
def test_roundtrip(rec: HandoffRecord) -> None:
    wire = build_record(rec)
    assert len(wire) <= MAX_RECORD
    assert record(wire) == rec


@given(_records, st.data())
def test_any_split_point_needs_more_then_completes(rec: HandoffRecord, data: st.DataObject) -> None:
    wire = build_record(rec)
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert parse_record(wire[:cut]) is NEED_MORE
    assert record(wire[:cut] + wire[cut:]) == rec


@given(st.binary(max_size=600))
def test_garbage_is_a_value_need_more_or_a_codec_error(data: bytes) -> None:
    try:
        r = parse_record(b"EWHO\x01\x00" + data)
    except CodecError:
        return
    if r is not NEED_MORE:
        assert isinstance(r, HandoffRecord) and 8 <= r.length <= len(data) + 6
        ipaddress.ip_address(r.client[0])


@given(_records, st.integers(0, 4095), st.integers(0, 255))
def test_one_corrupted_byte_never_escapes(rec: HandoffRecord, pos: int, value: int) -> None:
    wire = bytearray(build_record(rec))
    wire[pos % len(wire)] = value
    try:
        parse_record(bytes(wire))
    except CodecError:
        pass
