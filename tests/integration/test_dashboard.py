"""The dashboard in headless Chromium (Debian's, driven by Playwright): behind the admin token with a
login page, every asset from the edge, live numbers from server-sent events that follow the traffic
and match the admin API, readable on a phone-sized screen. Screenshots are kept as test artifacts
(test-artifacts/, or $EDGEWARD_TEST_ARTIFACTS).
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import (
    EdgeProcess,
    ThreadServer,
    connect_from,
    echo_handler,
    free_port,
    require,
)

TOKEN = "s3cret-token-for-the-dashboard"
ARTIFACTS = Path(os.environ.get("EDGEWARD_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def request(admin: int, method: str, path: str, headers: dict[str, str] | None = None,
            data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", method=method, data=data, headers=headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kw: Any) -> None:
            return None
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def api(admin: int, path: str) -> Any:
    code, _, body = request(admin, "GET", path, {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200, body
    return json.loads(body)


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[tuple[EdgeProcess, int, ThreadServer]]:
    up = ThreadServer(echo_handler())
    port, admin = free_port(), free_port()
    e = EdgeProcess(tmp_path, f"""
[edge]
admin = "127.0.0.1:{admin}"
admin_token = "{TOKEN}"
state_dir = "{tmp_path / 'state'}"
[pools.app]
servers = ["127.0.0.1:{up.port}", "127.0.0.1:{free_port()}"]
health = {{ interval = "0.3s", timeout = "1s" }}  # (the down server refuses at once)
[services.web]
listen = ["127.0.0.1:{port}"]
to = "app"
[services.chat]
listen = ["127.0.0.1:{free_port()}"]
to = "127.0.0.1:{up.port}"
""", admin_port=admin, wait=[("127.0.0.1", port)])
    try:
        yield e, port, up
    finally:
        e.stop()
        up.close()


def test_token_cookie_and_assets(edge: tuple[EdgeProcess, int, ThreadServer]) -> None:
    e, _, _ = edge
    admin = e.admin_port
    code, headers, _ = request(admin, "GET", "/")
    assert code == 303 and headers["Location"] == "/login"
    assert request(admin, "GET", "/events")[0] == 401
    assert request(admin, "GET", "/status")[0] == 401
    code, headers, body = request(admin, "GET", "/login")
    assert code == 200 and b'name="token"' in body and "default-src 'none'" in headers["Content-Security-Policy"]
    code, _, body = request(admin, "POST", "/login", data=b"token=wrong")
    assert code == 401 and b"Wrong token." in body
    code, headers, _ = request(admin, "POST", "/login", data=f"token={TOKEN}".encode())
    assert code == 303 and "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    cookie = {"Cookie": headers["Set-Cookie"].split(";", 1)[0]}
    code, headers, body = request(admin, "GET", "/", cookie)
    assert code == 200 and b"/dashboard/app.js" in body and b"http" not in body.split(b"<body>", 1)[1].lower()
    assert request(admin, "GET", "/status", cookie)[0] == 200
    assert request(admin, "POST", "/reload", cookie)[0] == 401  # the cookie reads; it never changes anything
    assert request(admin, "POST", "/reload", {"Authorization": f"Bearer {TOKEN}"})[0] in (200, 422)
    for asset, ctype in (("app.js", "text/javascript"), ("app.css", "text/css"), ("icon.svg", "image/svg+xml")):
        code, headers, body = request(admin, "GET", f"/dashboard/{asset}")
        assert code == 200 and headers["Content-Type"].startswith(ctype) and body
    assert request(admin, "GET", "/dashboard/../api.py")[0] == 404
    assert request(admin, "GET", "/dashboard/nothing.js")[0] == 404
    # The event stream: a JSON view a second.
    with socket.create_connection(("127.0.0.1", admin), timeout=5) as s:
        s.sendall(f"GET /events HTTP/1.1\r\nHost: x\r\nCookie: {cookie['Cookie']}\r\n\r\n".encode())
        got = b""
        while got.count(b"data: ") < 2:
            chunk = s.recv(65536)
            assert chunk
            got += chunk
        assert b"text/event-stream" in got
        view = json.loads(got.split(b"data: ", 1)[1].split(b"\n\n", 1)[0])
        assert set(view["services"]) == {"web", "chat"} and view["clients"] == 0
    assert e.proc.poll() is None


def test_dashboard_in_chromium(edge: tuple[EdgeProcess, int, ThreadServer]) -> None:
    chromium = require("chromium")
    try:
        from playwright import sync_api
    except ImportError:  # a test extra (pyproject.toml): missing only outside `make`
        if os.environ.get("CI"):
            pytest.fail("playwright is not installed (pip install -e '.[test]')")
        pytest.skip("playwright not installed")
    e, port, _ = edge
    admin = e.admin_port
    base = f"http://127.0.0.1:{admin}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    requested: list[str] = []
    conns: list[socket.socket] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
            page.on("request", lambda r: requested.append(r.url))
            page.goto(base + "/")
            assert page.url == base + "/login"
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_url(base + "/")
            expect = sync_api.expect
            expect(page.locator("#state")).to_have_class(re.compile("live"), timeout=10_000)

            def text(selector: str) -> str:
                return str(page.text_content(selector) or "").strip()

            def web_cell(cls: str) -> str:
                return text(f'#services tr[data-service="web"] td.{cls}')
            page.wait_for_selector("#servers td.health.down", timeout=10_000)
            assert text("#clients") == "0" and web_cell("clients") == "0"

            # Traffic: 3 connections from 2 addresses to web, 1 to chat from a third.
            conns = [connect_from("127.0.0.41", port), connect_from("127.0.0.41", port),
                     connect_from("127.0.0.42", port)]
            for c in conns:
                c.sendall(b"q" * 200_000)
                got = 0
                while got < 200_000:
                    got += len(c.recv(65536))
            expect(page.locator("#clients")).to_have_text("2", timeout=10_000)
            expect(page.locator('#services tr[data-service="web"] td.in')).not_to_have_text("0 B/s", timeout=10_000)
            # The page's numbers are the API's: compare one update with the status read right after.
            expect(page.locator('#services tr[data-service="web"] td.active')).to_have_text("3", timeout=10_000)
            st = api(admin, "/status")
            assert text("#clients") == str(st["clients"]) == "2"
            assert text("#connections") == str(st["connections"]) == "3"
            assert web_cell("clients") == str(st["services"]["web"]["clients"]) == "2"
            assert web_cell("active") == str(st["services"]["web"]["active"])
            srv = next(s for s in st["pools"]["app"]["servers"] if s["available"])
            row = f'#servers tr[data-server="{srv["server"]}"]'
            assert text(f"{row} td.clients") == str(srv["clients"]) == "2"
            assert text(f"{row} td.health") == "up"
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # A phone: nothing wider than the screen but the tables' own scrolling boxes.
            phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                     has_touch=True)
            phone.on("console", lambda m: problems.append(f"phone console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
            phone.on("pageerror", lambda err: problems.append(f"phone page error: {err}"))
            phone.context.add_cookies(page.context.cookies())
            phone.goto(base + "/")
            expect(phone.locator("#clients")).to_have_text("2", timeout=10_000)
            assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            assert phone.evaluate("getComputedStyle(document.querySelector('.card .value')).fontSize") >= "16px"
            phone.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)

            # They leave: the numbers drop back.
            for c in conns:
                c.close()
            conns.clear()
            expect(page.locator("#clients")).to_have_text("0", timeout=10_000)
            assert web_cell("active") == "0"
            # The chart has drawn a line through what it saw.
            assert len(str(page.get_attribute("#chart-clients path.line", "d"))) > 10
        finally:
            for c in conns:
                c.close()
            browser.close()
    assert not problems, problems
    assert requested and all(u.startswith(base) for u in requested), [u for u in requested if not u.startswith(base)]
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
