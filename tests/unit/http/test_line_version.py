"""exchange.line_version: a request's version read off the bytes of its read agrees with llhttp.

The client connection reads the version of a read's first request from its request line instead
of asking httptools (whose get_http_version() formats a string). Whatever the bytes, when llhttp
completes the head, the answer is either None (llhttp is then asked) or what llhttp parsed.
"""

from __future__ import annotations

import httptools
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward.http.exchange import line_version


class _Head:
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url: list[bytes] = []
        self.seen: tuple[bytes, bytes, str] | None = None

    def on_url(self, url: bytes) -> None:
        self.url.append(url)

    def on_headers_complete(self) -> None:
        if self.seen is None:
            self.seen = (self.parser.get_method(), b"".join(self.url), self.parser.get_http_version())


def llhttp(data: bytes) -> tuple[bytes, bytes, str] | None:
    h = _Head()
    try:
        h.parser.feed_data(data)
    except httptools.HttpParserError:
        pass
    return h.seen


def test_the_usual_lines() -> None:
    assert line_version(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET", b"/") == "1.1"
    assert line_version(b"POST /x?y=1 HTTP/1.0\r\n\r\n", b"POST", b"/x?y=1") == "1.0"
    assert line_version(b"GET / HTTP/1.1", b"GET", b"/") is None  # the line is not all here
    assert line_version(b"\r\nGET / HTTP/1.1\r\n\r\n", b"GET", b"/") is None  # an empty line first
    assert line_version(b"GET / HTTP/1.1\n\r\n", b"GET", b"/") is None  # a bare LF


_targets = st.sampled_from([b"/", b"/a", b"/HTTP/1.1", b"/a HTTP/1.0", b"*", b"/x?q=HTTP/1.0 "]) | st.binary(max_size=10)
_versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/1.", b"", b"HTTP/1.1 "])


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from([b"", b"\r\n", b"\n", b"\r\n\r\n"]), st.sampled_from([b"GET", b"POST", b"G", b"GET "]), _targets,
       _versions, st.sampled_from([b"\r\n", b"\n", b" \r\n", b"\r"]), st.booleans())
def test_the_answer_is_none_or_what_llhttp_parsed(lead: bytes, method: bytes, target: bytes, version: bytes,
                                                   eol: bytes, cut: bool) -> None:
    line = lead + method + b" " + target + b" " + version + eol + b"Host: a\r\n\r\n"
    seen = llhttp(line)
    if seen is None:
        return  # llhttp refused the line: the connection ends and nothing asks its version
    m, url, parsed = seen
    read = line[:len(line) // 2] if cut else line
    got = line_version(read, m, url)
    assert got is None or got == parsed, line
    if not lead and not cut and eol == b"\r\n" and version in (b"HTTP/1.1", b"HTTP/1.0") and (m, url) == (method, target):
        assert got == parsed  # the usual request is read off its line
