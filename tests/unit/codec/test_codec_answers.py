"""The edge's own refusal messages are complete, well-formed protocol messages."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeward.codec.answers import UNRECOGNIZED_NAME, http_response, tls_alert


def test_tls_alert_is_one_fatal_alert_record() -> None:
    rec = tls_alert(UNRECOGNIZED_NAME)
    assert rec[0] == 0x15 and rec[1:3] == b"\x03\x03"  # alert, TLS 1.2 record version
    assert int.from_bytes(rec[3:5], "big") == len(rec) - 5 == 2
    assert rec[5:] == bytes([2, 112])  # fatal, unrecognized_name
    with pytest.raises(ValueError):
        tls_alert(256)


@given(st.integers(100, 599), st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
       st.text(max_size=200))
def test_http_response_is_framed_by_its_content_length(status: int, reason: str, body: str) -> None:
    raw = http_response(status, reason, body)
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == f"HTTP/1.1 {status} {reason}".encode()
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert int(headers[b"Content-Length"]) == len(payload) == len(body.encode("utf-8", "replace"))
    assert headers[b"Connection"] == b"close"


def test_http_response_refuses_a_split_status_line() -> None:
    for reason in ("OK\r\nX-Evil: 1", "caf\u00e9"):
        with pytest.raises(ValueError):
            http_response(200, reason, "")
