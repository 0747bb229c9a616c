"""Response heads: checks on the upstream's, and the head the client gets."""

from __future__ import annotations

import httptools
import pytest

from edgeward.http import forwarding as fw
from edgeward.http.request import Rejected


def resp(status: int, headers: list[tuple[bytes, bytes]], method: bytes = b"GET", keep_alive: bool = True) -> fw.ResponseHead:
    return fw.validate_response(status, b"", headers, version="1.1", request_method=method, parser_keep_alive=keep_alive)


def test_framings() -> None:
    assert resp(200, [(b"Content-Length", b"5")]).framing == fw.LENGTH
    assert resp(200, [(b"Transfer-Encoding", b"chunked")]).framing == fw.CHUNKED
    r = resp(200, [], keep_alive=False)
    assert r.framing == fw.UNTIL_CLOSE and not r.upstream_keep_alive
    assert resp(200, [(b"Content-Length", b"5")], b"HEAD").framing == fw.NO_BODY
    assert resp(304, [(b"Content-Length", b"5")]).framing == fw.NO_BODY
    assert not resp(200, [(b"Content-Length", b"5"), (b"Connection", b"close")]).upstream_keep_alive


@pytest.mark.parametrize(("status", "headers"), [
    (99, []), (600, []),
    (200, [(b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")]),
    (200, [(b"Content-Length", b"1"), (b"Content-Length", b"1")]),
    (200, [(b"Transfer-Encoding", b"gzip")]),
])
def test_bad_upstream_responses_are_502(status: int, headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Rejected) as ei:
        resp(status, headers)
    assert ei.value.status == 502


def test_client_head_rechunks_for_http11_and_closes_for_http10() -> None:
    r = resp(200, [(b"Server", b"x"), (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5")],
             keep_alive=False)
    head, framing = fw.client_response_head(r, client_v11=True, keep_alive=True)
    assert framing == fw.CHUNKED and b"Transfer-Encoding: chunked\r\n" in head
    assert b"X-Hop" not in head and b"Keep-Alive" not in head and b"Server: x" in head
    head, framing = fw.client_response_head(r, client_v11=False, keep_alive=True)
    assert framing == fw.UNTIL_CLOSE and b"Connection: close\r\n" in head and b"Transfer-Encoding" not in head
    r = resp(200, [(b"Content-Length", b"3")])
    head, framing = fw.client_response_head(r, client_v11=False, keep_alive=True)
    assert framing == fw.LENGTH and b"Connection: keep-alive\r\n" in head and head.count(b"Content-Length") == 1


def test_head_and_204_304_lengths() -> None:
    head, framing = fw.client_response_head(resp(200, [(b"Content-Length", b"42")], b"HEAD"), client_v11=True, keep_alive=True)
    assert framing == fw.NO_BODY and b"Content-Length: 42\r\n" in head
    head, _ = fw.client_response_head(resp(204, [(b"Content-Length", b"0")]), client_v11=True, keep_alive=True)
    assert b"Content-Length" not in head


def test_client_head_parses_back() -> None:
    r = resp(201, [(b"Location", b"/x"), (b"Content-Length", b"2")])
    head, _ = fw.client_response_head(r, client_v11=True, keep_alive=True)
    seen: list[tuple[bytes, bytes]] = []

    class P:
        def on_header(self, n: bytes, v: bytes) -> None:
            seen.append((n, v))

    p = httptools.HttpResponseParser(P())
    p.feed_data(head + b"ok")
    assert p.get_status_code() == 201 and (b"Location", b"/x") in seen


def test_switching_protocols_head() -> None:
    head = fw.switching_protocols_head(b"Switching Protocols", [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                                                               (b"Sec-WebSocket-Accept", b"abc")])
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: abc\r\n" in head and head.endswith(b"Upgrade: websocket\r\nConnection: upgrade\r\n\r\n")
