"""Request heads: validation (sans-I/O) and the canonical head written upstream."""

from __future__ import annotations

import re

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward.http.forwarding import upstream_request_head
from edgeward.http.request import Rejected, RequestHead, length_value, validate_request


def ok(headers: list[tuple[bytes, bytes]], method: bytes = b"GET", target: bytes = b"/", version: str = "1.1") -> RequestHead:
    return validate_request(method, target, version, headers)


def rejected(headers: list[tuple[bytes, bytes]], method: bytes = b"GET", target: bytes = b"/", version: str = "1.1") -> int:
    with pytest.raises(Rejected) as ei:
        validate_request(method, target, version, headers)
    return ei.value.status


H = [(b"Host", b"A.Example.org:8443")]


def test_plain_get() -> None:
    r = ok(H, target=b"/a/b?x=1")
    assert (r.host, r.authority, r.path, r.query) == ("a.example.org", b"A.Example.org:8443", b"/a/b", b"x=1")
    assert r.keep_alive and not r.has_body and r.upgrade is None


@pytest.mark.parametrize(("headers", "method", "target", "version", "status"), [
    ([], b"GET", b"/", "1.1", 400),  # HTTP/1.1 without Host
    (H + H, b"GET", b"/", "1.1", 400),  # two Hosts
    ([(b"Host", b"a b")], b"GET", b"/", "1.1", 400),
    ([(b"Host", b"a.org:x")], b"GET", b"/", "1.1", 400),
    ([(b"Host", b"user@a.org")], b"GET", b"/", "1.1", 400),
    ([(b"Host", b"[::1")], b"GET", b"/", "1.1", 400),
    (H, b"GET", b"http://evil.example/", "1.1", 400),  # absolute-form: never a forward proxy
    (H, b"CONNECT", b"evil.example:443", "1.1", 405),
    (H, b"OPTIONS", b"*", "1.1", 400),
    (H, b"GET", b"/a#frag", "1.1", 400),
    (H, b"GET", b"/", "2.0", 505),
    (H, b"GET", b"/", "0.9", 400),
    ([*H, (b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")], b"POST", b"/", "1.1", 400),
    ([*H, (b"Content-Length", b"3"), (b"Content-Length", b"3")], b"POST", b"/", "1.1", 400),
    ([*H, (b"Content-Length", b"3, 3")], b"POST", b"/", "1.1", 400),
    ([*H, (b"Content-Length", b"+3")], b"POST", b"/", "1.1", 400),
    ([*H, (b"Content-Length", b"0x3")], b"POST", b"/", "1.1", 400),
    ([*H, (b"Transfer-Encoding", b"gzip, chunked")], b"POST", b"/", "1.1", 501),
    ([*H, (b"Transfer-Encoding", b"chunked, gzip")], b"POST", b"/", "1.1", 400),
    ([*H, (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], b"POST", b"/", "1.1", 400),
    ([*H, (b"Transfer-Encoding", b"xchunked")], b"POST", b"/", "1.1", 400),
    ([*H, (b"Transfer-Encoding", b"chunked")], b"POST", b"/", "1.0", 400),  # RFC 9112 6.1
    ([*H, (b"Expect", b"something-else")], b"GET", b"/", "1.1", 417),
    ([*H, (b"Connection", b"upgrade"), (b"Upgrade", b"websocket"), (b"Content-Length", b"5")], b"POST", b"/", "1.1", 400),
])
def test_rejected(headers: list[tuple[bytes, bytes]], method: bytes, target: bytes, version: str, status: int) -> None:
    assert rejected(headers, method, target, version) == status


def test_framing_and_connection() -> None:
    r = ok([*H, (b"Transfer-Encoding", b" Chunked ")], b"POST")
    assert r.chunked and r.content_length is None and r.has_body
    r = ok([*H, (b"Content-Length", b"0")], b"POST")
    assert r.content_length == 0 and not r.has_body
    assert not ok([*H, (b"Connection", b"close")]).keep_alive
    assert not ok(H, version="1.0").keep_alive
    assert ok([*H, (b"Connection", b"Keep-Alive")], version="1.0").keep_alive
    assert ok([], version="1.0").host is None
    assert ok([*H, (b"Expect", b"100-Continue")], b"PUT").expect_continue
    assert not ok([*H, (b"Expect", b"100-continue")], b"PUT", version="1.0").expect_continue  # ignored in 1.0


def test_upgrades() -> None:
    r = ok([*H, (b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket")])
    assert r.upgrade == b"websocket"
    assert ok([*H, (b"Upgrade", b"websocket")]).upgrade is None  # no Connection: upgrade
    assert ok([*H, (b"Connection", b"upgrade"), (b"Upgrade", b"h2c")]).upgrade is None  # never h2c
    assert ok([*H, (b"Connection", b"upgrade"), (b"Upgrade", b"h2c, websocket")]).upgrade == b"websocket"
    assert ok([*H, (b"Connection", b"upgrade"), (b"Upgrade", b"websocket")], version="1.0").upgrade is None


def test_ipv6_host() -> None:
    assert ok([(b"Host", b"[2001:DB8::1]:443")]).host == "2001:db8::1"


class _Collect:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.done = False

    def on_url(self, u: bytes) -> None:
        self.url += u

    def on_header(self, n: bytes, v: bytes) -> None:
        self.headers.append((n, v))

    def on_body(self, b: bytes) -> None:
        self.body += b

    def on_message_complete(self) -> None:
        self.done = True


def reparse(head: bytes) -> tuple[httptools.HttpRequestParser, _Collect]:
    c = _Collect()
    p = httptools.HttpRequestParser(c)
    try:
        p.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # an upgrade request (any Upgrade token with Connection: upgrade): its head was read whole
    return p, c


def test_upstream_head_untrusted_client() -> None:
    r = ok([(b"Host", b"a.example.org"), (b"X-Forwarded-For", b"6.6.6.6"), (b"X-Forwarded-Proto", b"http"),
            (b"X-Forwarded-Host", b"evil"), (b"X-Real-IP", b"6.6.6.6"), (b"Forwarded", b"for=6.6.6.6"),
            (b"X-Forwarded-Port", b"1"), (b"Connection", b"close, X-Secret"), (b"X-Secret", b"hop"),
            (b"Keep-Alive", b"timeout=5"), (b"Proxy-Authorization", b"Basic x"), (b"TE", b"trailers"),
            (b"Cookie", b"a=b")], b"GET", b"/p?q")
    head = upstream_request_head(r, client_ip="2001:db8::7", scheme="https", trusted=False)
    p, c = reparse(head)
    got = {n.lower(): v for n, v in c.headers}
    assert c.url == b"/p?q" and p.get_http_version() == "1.1" and p.should_keep_alive()
    assert got[b"x-forwarded-for"] == b"2001:db8::7"
    assert got[b"x-forwarded-proto"] == b"https"
    assert got[b"x-forwarded-host"] == b"a.example.org"
    assert got[b"x-real-ip"] == b"2001:db8::7"
    assert got[b"forwarded"] == b'for="[2001:db8::7]";host=a.example.org;proto=https'
    assert got[b"cookie"] == b"a=b"
    for gone in (b"x-forwarded-port", b"x-secret", b"keep-alive", b"proxy-authorization", b"te", b"connection"):
        assert gone not in got
    assert sum(1 for n, _ in c.headers if n.lower() == b"x-forwarded-for") == 1


def test_upstream_head_trusted_proxy_appends() -> None:
    r = ok([(b"Host", b"a.example.org:8443"), (b"X-Forwarded-For", b"198.51.100.1"), (b"X-Forwarded-For", b"10.0.0.1"),
            (b"X-Forwarded-Proto", b"https"), (b"Forwarded", b"for=198.51.100.1")])
    head = upstream_request_head(r, client_ip="192.0.2.9", scheme="http", trusted=True)
    _, c = reparse(head)
    got = {n.lower(): v for n, v in c.headers}
    assert got[b"x-forwarded-for"] == b"198.51.100.1, 10.0.0.1, 192.0.2.9"
    assert got[b"x-forwarded-proto"] == b"https"  # the first proxy's scheme is kept
    assert got[b"forwarded"] == b'for=198.51.100.1, for=192.0.2.9;host="a.example.org:8443";proto=http'


def test_upstream_head_framing_is_rebuilt() -> None:
    r = ok([*H, (b"Transfer-Encoding", b"chunked")], b"POST")
    _, c = reparse(upstream_request_head(r, client_ip="192.0.2.1", scheme="http", trusted=False) + b"3\r\nabc\r\n0\r\n\r\n")
    assert c.body == b"abc" and c.done
    r = ok([*H, (b"Content-Length", b"3")], b"POST")
    head = upstream_request_head(r, client_ip="192.0.2.1", scheme="http", trusted=False)
    assert head.count(b"Content-Length: 3\r\n") == 1
    r = ok([*H, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Key", b"k")])
    head = upstream_request_head(r, client_ip="192.0.2.1", scheme="http", trusted=False)
    assert b"\r\nConnection: upgrade\r\nUpgrade: websocket\r\n" in head and b"Sec-WebSocket-Key: k" in head


# --- properties ---------------------------------------------------------------------------------

_token = st.text(alphabet="!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-", min_size=1, max_size=12)
_names = st.one_of(_token, st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade",
                                            "Expect", "X-Forwarded-For", "Forwarded", "Keep-Alive", "TE", "X-Real-IP",
                                            "X-Forwarded-Proto", "X-Forwarded-Host", "Trailer", "Proxy-Connection"]))
_values = st.one_of(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20),
                    st.sampled_from(["chunked", "gzip, chunked", "5", "0", "upgrade", "close", "websocket", "h2c",
                                     "100-continue", "a.example.org", "keep-alive", "1, 2", "-1", "[::1]:80"]))
_headers = st.lists(st.tuples(_names.map(str.encode), _values.map(str.encode)), max_size=8)
_targets = st.one_of(st.sampled_from([b"/", b"/a?b", b"*", b"http://x/", b"x:443", b"/a#b"]),
                     st.binary(min_size=1, max_size=20))


@settings(max_examples=600, deadline=None)
@given(method=st.sampled_from([b"GET", b"POST", b"HEAD", b"CONNECT", b"PUT", b"OPTIONS"]), target=_targets,
       version=st.sampled_from(["1.1", "1.0", "2.0", "0.9"]), headers=_headers, trusted=st.booleans())
def test_validation_total_and_forwarded_head_unambiguous(method: bytes, target: bytes, version: str,
                                                         headers: list[tuple[bytes, bytes]], trusted: bool) -> None:
    """Any input is either Rejected with a 4xx/5xx, or yields a head that a strict parser reads back
    as the same request with exactly one framing and no hop-by-hop field."""
    try:
        r = validate_request(method, target, version, headers)
    except Rejected as e:
        assert 400 <= e.status <= 505
        return
    head = upstream_request_head(r, client_ip="192.0.2.1", scheme="https", trusted=trusted)
    p, c = reparse(head)
    assert c.url == target and p.get_method() == method
    names = [n.lower() for n, _ in c.headers]
    assert names.count(b"content-length") + names.count(b"transfer-encoding") <= 1
    assert names.count(b"host") == (1 if r.authority is not None else 0)
    assert (b"transfer-encoding" in names) == r.chunked
    assert names.count(b"x-forwarded-for") == 1 and names.count(b"forwarded") == 1
    for hop in (b"keep-alive", b"te", b"trailer", b"proxy-connection"):
        assert hop not in names
    assert (b"upgrade" in names) == (r.upgrade is not None)
    xff = dict((n.lower(), v) for n, v in c.headers)[b"x-forwarded-for"]
    assert xff.endswith(b"192.0.2.1")
    if not trusted:
        assert xff == b"192.0.2.1"


@given(st.one_of(st.binary(max_size=24), st.text("0123456789 +-_٣x", max_size=24).map(lambda t: t.encode())))
def test_a_content_length_is_one_to_eighteen_ascii_digits(value: bytes) -> None:
    expected = int(value) if re.fullmatch(rb"[0-9]{1,18}", value) else -1
    assert length_value(value) == expected


@given(st.binary(max_size=12).map(lambda b: b"/" + b) | st.binary(max_size=12))
def test_a_target_is_accepted_when_origin_form_printable_ascii_without_a_fragment(target: bytes) -> None:
    expected = re.fullmatch(rb"/[\x21-\x7e]*", target) is not None and b"#" not in target
    try:
        validate_request(b"GET", target, "1.1", H)
    except Rejected as e:
        assert not expected and e.status == 400
    else:
        assert expected
