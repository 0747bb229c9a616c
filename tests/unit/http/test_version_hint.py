"""The request version read off the request line (exchange._request_version) agrees with llhttp.

The client connection reads the first request's version from the bytes of its read instead of
asking httptools (whose get_http_version() formats a string). Whatever the bytes, when llhttp
completes the request's head the hint is either None (llhttp is asked) or what llhttp parsed.
"""

from __future__ import annotations

import httptools
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward.http.exchange import _request_version


class _Head:
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.version: str | None = None

    def on_headers_complete(self) -> None:
        if self.version is None:
            self.version = self.parser.get_http_version()


def llhttp_version(data: bytes) -> str | None:
    p = _Head()
    try:
        p.parser.feed_data(data)
    except httptools.HttpParserError:
        pass
    return p.version


def test_the_usual_request_lines() -> None:
    assert _request_version(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == "1.1"
    assert _request_version(b"GET /x?y HTTP/1.0\r\n\r\n") == "1.0"
    assert _request_version(b"GET / HTTP/1.1") is None  # the line is not all here
    assert _request_version(b"\r\nGET / HTTP/1.1\r\n\r\n") is None  # an empty line first: llhttp decides
    assert _request_version(b"GET / HTTP/1.1\n\r\n") is None  # a bare LF: llhttp decides
    assert _request_version(b"GET / HTTP/2.0\r\n\r\n") is None


_pieces = st.sampled_from([b"GET", b"POST", b" ", b"/", b"/a?b=HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.", b"\r\n",
                           b"\n", b"\r", b"Host: a", b"X: HTTP/1.0", b"\t", b"0", b"9", b"HTTP/0.9", b"HTTP/2.0"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_pieces, max_size=14))
def test_the_hint_is_none_or_what_llhttp_parses(parts: list[bytes]) -> None:
    data = b"".join(parts) + b"\r\n\r\n"
    hint = _request_version(data)
    parsed = llhttp_version(data)  # None: llhttp rejects the line, and the connection ends unanswered by it
    if hint is not None and parsed is not None:
        assert hint == parsed, data


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([b"GET", b"HEAD", b"OPTIONS"]), st.binary(max_size=40).map(lambda b: b"/" + b.hex().encode()),
       st.sampled_from([b"1.1", b"1.0"]))
def test_well_formed_lines_always_give_a_hint(method: bytes, target: bytes, version: bytes) -> None:
    data = method + b" " + target + b" HTTP/" + version + b"\r\nHost: a\r\n\r\n"
    assert _request_version(data) == version.decode() == llhttp_version(data)
