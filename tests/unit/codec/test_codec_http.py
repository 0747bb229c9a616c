from __future__ import annotations

import http.client

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeward.codec import NEED_MORE, CodecError, HTTPError, HTTPRequestHead, parse_http_head
from edgeward.codec.http import MAX_HEAD, classify_http


class _Capture:
    """Just enough of a socket for http.client to write a request into."""

    def __init__(self) -> None:
        self.sent = b""

    def sendall(self, data: bytes) -> None:
        self.sent += data


def stdlib_request(method: str, url: str, host: str, **headers: str) -> bytes:
    conn = http.client.HTTPConnection(host)
    capture = _Capture()
    conn.sock = capture  # type: ignore[assignment]
    conn.request(method, url, headers=headers)
    return capture.sent


def head(data: bytes) -> HTTPRequestHead:
    result = parse_http_head(data)
    assert isinstance(result, HTTPRequestHead)
    return result


CURL = (
    b"GET /index.php?x=1 HTTP/1.1\r\nHost: Cloud.Example.ORG\r\n"
    b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
)


class TestValid:
    def test_curl(self) -> None:
        assert head(CURL + b"tail") == HTTPRequestHead(
            "GET", "/index.php?x=1", "HTTP/1.1", "cloud.example.org", len(CURL)
        )

    def test_stdlib_client(self) -> None:
        data = stdlib_request("POST", "/api", "api.example.org:8443", Accept="*/*")
        h = head(data)
        assert (h.method, h.target, h.host, h.length) == (
            "POST",
            "/api",
            "api.example.org",
            data.index(b"\r\n\r\n") + 4,
        )

    @pytest.mark.parametrize(
        ("value", "host"),
        [
            (b"example.org", "example.org"),
            (b"EXAMPLE.org.:80", "example.org"),
            (b"[2001:DB8::1]:8080", "2001:db8::1"),
            (b"[::1]", "::1"),
            (b"192.0.2.1:80", "192.0.2.1"),
            (b"  spaced.example \t", "spaced.example"),
            (b"", None),
            (b"example.org:", "example.org"),  # RFC 3986: port = *DIGIT
        ],
    )
    def test_host_forms(self, value: bytes, host: str | None) -> None:
        assert head(b"GET / HTTP/1.1\r\nhOsT:" + value + b"\r\n\r\n").host == host

    def test_no_host(self) -> None:
        assert head(b"GET / HTTP/1.0\r\n\r\n").host is None

    def test_absolute_form_wins(self) -> None:
        data = b"GET HTTP://User@Real.Example:81/p HTTP/1.1\r\nHost: other.example\r\n\r\n"
        assert head(data).host == "real.example"

    def test_connect(self) -> None:
        assert head(b"CONNECT db.example:5432 HTTP/1.1\r\n\r\n").host == "db.example"

    def test_h2_prior_knowledge_preface(self) -> None:
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        assert head(preface) == HTTPRequestHead("PRI", "*", "HTTP/2.0", None, 18)

    def test_every_prefix_needs_more(self) -> None:
        for n in range(len(CURL)):
            assert parse_http_head(CURL[:n]) is NEED_MORE, n

    def test_head_at_the_bound(self) -> None:
        line = b"GET / HTTP/1.1\r\nX: "
        data = line + b"a" * (MAX_HEAD - len(line) - 4) + b"\r\n\r\n"
        assert head(data).length == MAX_HEAD


class TestMalformed:
    @pytest.mark.parametrize(
        "data",
        [
            b"\x16\x03\x01",  # TLS
            b"<stream:stream",
            b" GET / HTTP/1.1",
            b"GET\t/ HTTP/1.1",
            b"G\x00T",
            b"A" * 33,  # no method is that long
            b"GET / HTTP/1.1\n\n",  # bare LF
            b"GET / HTTP/1.1 \r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1x\r\n\r\n",
            b"GET /\r\n\r\n",  # HTTP/0.9
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: y\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: exa_mple!.org\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a:b:c\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a:123456\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [zz::1]\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9.example\r\n\r\n",
        ],
    )
    def test_rejected(self, data: bytes) -> None:
        with pytest.raises(HTTPError):
            parse_http_head(data)

    def test_bad_request_line_rejected_before_headers_end(self) -> None:
        with pytest.raises(HTTPError):
            parse_http_head(b"GET / HTTX/1.1\r\nHost: a")

    def test_oversized(self) -> None:
        data = b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD
        assert parse_http_head(data[: MAX_HEAD - 1]) is NEED_MORE
        with pytest.raises(HTTPError, match="exceeds"):
            parse_http_head(data[:MAX_HEAD])
        with pytest.raises(HTTPError):
            parse_http_head(b"GET /" + b"a" * MAX_HEAD)


class TestClassify:
    @pytest.mark.parametrize(
        ("data", "verdict"),
        [
            (b"", None),
            (b"GE", None),
            (b"GET ", None),
            (b"GET /x HT", None),
            (b"GET /x HTTP/", True),
            (b"CAP LS 302\r\n", False),  # IRC
            (b"NICK x\r\n", False),
            (b"GET /\r\n", False),  # HTTP/0.9: left to the default route
            (b"*1\r\n$4\r\nPING\r\n", False),  # Redis
            (b"\x00\x00", False),
        ],
    )
    def test_verdicts(self, data: bytes, verdict: bool | None) -> None:
        assert classify_http(data) is verdict


class TestProperties:
    @given(st.binary(max_size=400))
    def test_any_bytes(self, data: bytes) -> None:
        for candidate in (data, b"GET / HTTP/1.1\r\n" + data, b"GET " + data):
            try:
                result = parse_http_head(candidate)
            except CodecError:
                continue
            assert result is NEED_MORE or result.length <= len(candidate)  # type: ignore[union-attr]

    @given(
        st.sampled_from(["GET", "POST", "PROPFIND", "OPTIONS", "M-SEARCH"]),
        st.from_regex(r"/[A-Za-z0-9._~%!$&'()*+,;=:@/-]{0,40}", fullmatch=True),
        st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
        st.lists(
            st.tuples(
                st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True),
                st.from_regex(r"[ -~]{0,30}", fullmatch=True),
            ),
            max_size=5,
        ),
        st.data(),
    )
    def test_round_trip(
        self,
        method: str,
        target: str,
        host: str,
        extra: list[tuple[str, str]],
        data: st.DataObject,
    ) -> None:
        fields = "".join(f"{k}: {v}\r\n" for k, v in extra)
        wire = f"{method} {target} HTTP/1.1\r\n{fields}Host: {host.upper()}\r\n\r\n".encode()
        assert head(wire + b"body") == HTTPRequestHead(method, target, "HTTP/1.1", host, len(wire))
        cut = data.draw(st.integers(0, len(wire) - 1))
        assert parse_http_head(wire[:cut]) is NEED_MORE
