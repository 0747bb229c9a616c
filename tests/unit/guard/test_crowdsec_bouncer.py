"""The bouncer's parts in process: LapiClient against a small HTTP server on loopback (an oversized
answer is refused, error answers are read bounded), and `_apply` on a real BanSet (deleted before
new, other types counted, ignoreip honoured, ranges enforced)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgeward.codec.crowdsec import Decision, StreamBatch
from edgeward.config.schema import CrowdSecSettings
from edgeward.guard import crowdsec
from edgeward.guard.banset import BanSet
from edgeward.guard.crowdsec import CrowdSecBouncer, LapiClient, LapiUnavailable


class Answer:
    status = 200
    body = b'{"new":null,"deleted":null}'


@pytest.fixture
def server() -> Iterator[tuple[int, type[Answer]]]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(Answer.status)
            self.send_header("Content-Length", str(len(Answer.body)))
            self.end_headers()
            self.wfile.write(Answer.body)

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1], Answer
    srv.shutdown()
    srv.server_close()


def client(port: int) -> LapiClient:
    return LapiClient(CrowdSecSettings(lapi_url=f"http://127.0.0.1:{port}/", api_key="k", timeout=2), "k", None)


def test_oversized_answer_is_an_error(server: tuple[int, type[Answer]], monkeypatch: pytest.MonkeyPatch) -> None:
    port, ans = server
    monkeypatch.setattr(crowdsec, "MAX_STREAM_BYTES", 100_000)
    ans.status, ans.body = 200, b'{"new":[' + b"1," * 100_000 + b"1]}"
    with pytest.raises(LapiUnavailable) as ei:
        client(port).stream(True)
    assert ei.value.kind == "protocol" and "larger than" in str(ei.value)


def test_error_answers_are_read_bounded(server: tuple[int, type[Answer]]) -> None:
    port, ans = server
    ans.status, ans.body = 503, b"x" * 1_000_000
    with pytest.raises(LapiUnavailable) as ei:
        client(port).stream(False)
    assert ei.value.kind == "http" and len(str(ei.value)) < 300
    ans.status, ans.body = 403, b'{"message":"access forbidden"}'
    with pytest.raises(LapiUnavailable) as ei:
        client(port).stream(False)
    assert ei.value.kind == "auth" and "'access forbidden'" in str(ei.value)


def dec(value: str, *, id: int = 1, type: str = "ban", duration: float = 3600.0) -> Decision:
    return Decision(id=id, type=type, scope="Range" if "/" in value else "Ip", value=value,
                    scenario="s", origin="crowdsec", duration=duration)


def test_apply_order_types_ignoreip_ranges() -> None:
    bs = BanSet()
    b = CrowdSecBouncer(CrowdSecSettings(lapi_url="http://127.0.0.1:1/", api_key="k"), bs,
                        ignore=["127.0.0.99/32", "10.9.0.0/16"])

    async def run() -> None:
        await b._apply(StreamBatch(new=[dec("127.0.0.1"), dec("127.0.0.99"), dec("127.0.2.0/24"),
                                        dec("10.9.8.0/24"), dec("10.0.0.0/8"), dec("127.0.0.3", type="captcha"),
                                        dec("127.0.0.4", duration=-1.0)]), True)
        # deleted first, then new: a decision deleted and re-added between two polls stays
        await b._apply(StreamBatch(new=[dec("127.0.0.1", id=2)], deleted=[dec("127.0.0.1")]), False)
        await b._apply(StreamBatch(deleted=[dec("127.0.2.0/24")]), False)

    asyncio.run(run())
    assert bs.is_banned("127.0.0.1") and b.decisions["127.0.0.1"].id == 2
    assert not bs.is_banned("127.0.0.99")  # ignoreip
    assert not bs.is_banned("10.9.8.1")  # a range inside ignoreip
    assert not bs.is_banned("10.1.1.1")  # a range that covers ignoreip: not enforced at all
    assert not bs.is_banned("127.0.2.1")  # deleted
    assert not bs.is_banned("127.0.0.3") and not bs.is_banned("127.0.0.4")
    st = b.status()
    assert (st["ignored"], st["other_type"], st["decisions"], st["deleted"]) == (3, 1, 1, 2)
