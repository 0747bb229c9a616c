"""Config for the HTTP layer: http(s):// targets, paths, upstream_tls, [http], and the loader's cross-checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeward.config.loader import ConfigError, loads, service_scheme
from edgeward.config.schema import parse_pin
from edgeward.config.units import Target, looks_like_address, parse_target
from edgeward.http.routes import route_for_service
from edgeward.upstream.pool import Pool, Server


def test_http_targets() -> None:
    assert parse_target("https://10.0.0.5") == Target("10.0.0.5", 443, None, "https")
    assert parse_target("http://127.0.0.1:5280/") == Target("127.0.0.1", 5280, None, "http")
    assert parse_target("HTTPS://[2001:db8::1]:8443") == Target("2001:db8::1", 8443, None, "https")
    assert str(parse_target("https://vm.lan")) == "https://vm.lan:443"
    assert parse_target("10.0.0.2:443").scheme is None and Target("h", 1).scheme is None  # old callers unchanged
    assert looks_like_address("https://web") and looks_like_address("HTTP://web")
    for bad in ("ftp://x", "http://x/path", "http://u@x", "http://", "https://x:0"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_pin_formats() -> None:
    colons = ":".join(["AB"] * 32)
    assert parse_pin(colons) == "ab" * 32
    assert parse_pin("sha256:" + "ab" * 32) == "ab" * 32
    assert parse_pin(f"SHA256 Fingerprint={colons}".split("=", 1)[1]) == "ab" * 32
    with pytest.raises(ValueError, match="fingerprint"):
        parse_pin("ab" * 31)


JITSI = """
[edge]
admin = "unix:/tmp/x/admin.sock"

[http]
trusted_proxies = ["10.0.0.0/8"]
upgraded_timeout = "12h"

[services.meet]
listen = ["[::]:443"]
names = ["meet.example.org"]
to = "https://10.0.0.5"
upstream_tls = { server_name = "meet.example.org", pin = "sha256:{pin}" }

[services.meet-bosh]
listen = ["[::]:443"]
names = ["meet.example.org"]
paths = ["/http-bind", "/xmpp-websocket/"]
to = "http://10.0.0.5:5280"

[services.cloud]
listen = ["[::]:443"]
names = ["cloud.example.org"]
to = "web"

[pools.web]
servers = ["http://10.0.0.6", "http://10.0.0.7"]
""".replace("{pin}", "ab" * 32)


def test_jitsi_like_config_loads_and_routes() -> None:
    cfg = loads(JITSI, "edge.toml")
    assert cfg.http.upgraded_timeout == 12 * 3600 and cfg.http.redirect == "[::]:80"
    assert cfg.services["meet-bosh"].paths == ["/http-bind", "/xmpp-websocket"]
    assert service_scheme(cfg, cfg.services["meet"]) == "https"
    assert service_scheme(cfg, cfg.services["cloud"]) == "http"
    svc = cfg.services["meet"]
    route = route_for_service("meet", svc, Pool("p", [Server(parse_target(svc.to))]))
    assert route.upstream.scheme == "https" and route.upstream.pin == bytes.fromhex("ab" * 32)
    assert route.upstream.server_name == "meet.example.org" and route.upstream.ssl is not None


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        loads(text, "edge.toml")
    return [str(p) for p in ei.value.problems]


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def test_paths_on_a_relayed_service_is_located() -> None:
    text = JITSI.replace('to = "web"', 'to = "10.0.0.6:443"\npaths = ["/x"]')
    (p,) = problems(text)
    line = line_of(text, 'paths = ["/x"]')
    assert p.startswith(f"edge.toml:{line}:") and "paths route HTTP requests" in p


def test_upstream_tls_on_plain_http_and_relayed() -> None:
    text = JITSI.replace('to = "http://10.0.0.5:5280"', 'to = "http://10.0.0.5:5280"\nupstream_tls = { verify = false }')
    (p,) = problems(text)
    assert "plain http://" in p and p.startswith(f"edge.toml:{line_of(text, 'verify = false')}:")
    ps = problems(JITSI.replace('to = "https://10.0.0.5"', 'to = "10.0.0.5:443"'))
    assert any("https:// upstreams only" in p for p in ps)


def test_mixed_schemes_in_a_pool() -> None:
    text = JITSI.replace('servers = ["http://10.0.0.6", "http://10.0.0.7"]', 'servers = ["http://10.0.0.6", "https://10.0.0.7"]')
    ps = problems(text)
    assert any("mixes servers of different kinds" in p and p.startswith(f"edge.toml:{line_of(text, 'servers =')}:") for p in ps)


def test_verify_false_with_pin_and_missing_ca() -> None:
    ps = problems(JITSI.replace('server_name = "meet.example.org",', 'verify = false,'))
    assert any("turns off the checks" in p for p in ps)
    ps = problems(JITSI.replace('pin = "sha256:' + "ab" * 32 + '"', 'ca = "/nonexistent/ca.pem"'))
    assert any("does not exist" in p for p in ps)


def test_ca_file_that_exists(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    loads(JITSI.replace('pin = "sha256:' + "ab" * 32 + '"', f'ca = "{ca}"'))


def test_http_service_cannot_send_proxy_headers_or_listen_on_udp() -> None:
    (p,) = problems(JITSI.replace('servers = ["http://10.0.0.6", "http://10.0.0.7"]',
                                  'servers = ["http://10.0.0.6", "http://10.0.0.7"]\nproxy_protocol = "v2"'))
    assert "X-Forwarded-For" in p
    ps = problems(JITSI.replace('listen = ["[::]:443"]\nnames = ["cloud.example.org"]', 'listen = ["udp/[::]:443"]'))
    assert any("proxies HTTP but listens on UDP" in p for p in ps)


def test_services_sharing_a_name_need_different_paths() -> None:
    ps = problems(JITSI.replace('paths = ["/http-bind", "/xmpp-websocket/"]', 'paths = ["/http-bind", "/"]'))
    assert any("both take" in p and "'/'" in p for p in ps)
    ps = problems(JITSI.replace('paths = ["/http-bind", "/xmpp-websocket/"]\n', ''))
    assert any("both take" in p for p in ps)
    # One name cannot be both proxied and relayed with the same match fields...
    ps = problems(JITSI + '\n[services.raw]\nlisten = ["[::]:443"]\nnames = ["meet.example.org"]\nto = "10.0.0.9:443"\n')
    assert any("one proxies HTTP and the other relays bytes" in p for p in ps)
    # ... but may be told apart by ALPN (XMPP direct TLS beside the web on one name).
    loads(JITSI + '\n[services.xmpps]\nlisten = ["[::]:443"]\nnames = ["meet.example.org"]\nalpn = ["xmpp-client"]\nto = "10.0.0.9:5223"\n')


@pytest.mark.parametrize("bad", ["/a b", "a", "/../x", "/a?b", "/a//b", "/%2e"])
def test_bad_paths(bad: str) -> None:
    (p,) = problems(JITSI.replace('paths = ["/http-bind", "/xmpp-websocket/"]', f'paths = ["{bad}"]'))
    assert "is not a path prefix" in p


def test_http_settings_validation() -> None:
    assert loads('[http]\nredirect = "off"\n').http.redirect == "off"
    ps = problems('[http]\nredirect = "udp/[::]:80"\n')
    assert any("one TCP address" in p for p in ps)
    ps = problems('[http]\nmax_header_bytes = "100"\n')
    assert ps and "max_header_bytes" in ps[0]
    assert loads('[http]\ntrusted_proxies = ["192.0.2.1"]\n').http.trusted_proxies == ["192.0.2.1/32"]
