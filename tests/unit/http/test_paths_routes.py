"""Routing inside HTTP: normalized paths, segment-aware prefixes, Host then path then source."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward.config.units import parse_target
from edgeward.http.paths import prefix_matches, routing_path
from edgeward.http.routes import HttpRoute, HttpRoutes, HttpUpstream
from edgeward.upstream.pool import Pool, Server


def test_routing_path_normalizes_what_servers_normalize() -> None:
    assert routing_path(b"/http-bind/../admin") == b"/admin"
    assert routing_path(b"/http-bind/..%2Fadmin") == b"/admin"
    assert routing_path(b"/http-bind//../admin") == b"/admin"
    assert routing_path(b"/http-bind%2f..%2fadmin") == b"/admin"
    assert routing_path(b"/a\\..\\b") == b"/b"
    assert routing_path(b"/%2e%2e/%2E/x") == b"/x"
    assert routing_path(b"/a/b/..") == b"/a/"
    assert routing_path(b"/..") == b"/"
    assert routing_path(b"/a.b/c..d/.e") == b"/a.b/c..d/.e"


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"b", b".", b"..", b"", b"%2e", b"%2F", b"%2e%2E", b"\\", b"x.y", b"%41"]),
                max_size=10))
def test_routing_path_is_canonical(segments: list[bytes]) -> None:
    p = routing_path(b"/" + b"/".join(segments))
    assert p.startswith(b"/") and b"//" not in p and b"\\" not in p
    assert b"/./" not in p + b"/" and b"/../" not in p + b"/"
    assert routing_path(p) == p  # a normalized path stays as it is (no '%' left to decode here)


def test_prefix_matches_whole_segments() -> None:
    assert prefix_matches(b"/http-bind", b"/http-bind")
    assert prefix_matches(b"/http-bind", b"/http-bind/x")
    assert not prefix_matches(b"/http-bind", b"/http-binder")
    assert prefix_matches(b"/", b"/anything")


def _up(name: str) -> HttpUpstream:
    return HttpUpstream(name, Pool(name, [Server(parse_target("http://127.0.0.1:1"))]), "http")


def test_lookup_order() -> None:
    web, bosh, ws, wild, any_, lan = (_up(n) for n in ("web", "bosh", "ws", "wild", "any", "lan"))
    routes = HttpRoutes([
        HttpRoute(web, ("meet.example.org",)),
        HttpRoute(bosh, ("meet.example.org",), (b"/http-bind",)),
        HttpRoute(ws, ("meet.example.org",), (b"/xmpp-websocket", b"/colibri-ws")),
        HttpRoute(lan, ("meet.example.org",), (b"/admin",), (ipaddress.ip_network("10.0.0.0/8"),)),
        HttpRoute(wild, ("*.example.org",), (b"/only",)),
        HttpRoute(any_, (), (b"/",)),
    ], redirect_names=["old.example.net"])
    assert routes.lookup("meet.example.org", b"/") is web
    assert routes.lookup("meet.example.org", b"/http-bind") is bosh
    assert routes.lookup("meet.example.org", b"/http-bind/x") is bosh
    assert routes.lookup("meet.example.org", b"/http-binder") is web
    assert routes.lookup("meet.example.org", b"/colibri-ws/1/2") is ws
    assert routes.lookup("meet.example.org", b"/admin", ipaddress.ip_address("10.1.2.3")) is lan
    assert routes.lookup("meet.example.org", b"/admin", ipaddress.ip_address("192.0.2.1")) is web
    assert routes.lookup("x.example.org", b"/only/a") is wild
    assert routes.lookup("x.example.org", b"/other") is any_  # falls through to the nameless service
    assert routes.lookup(None, b"/") is any_
    assert routes.serves("meet.example.org") and routes.serves("deep.x.example.org") and not routes.serves("example.org")
    assert routes.serves("old.example.net") and routes.redirects("old.example.net")
    assert not routes.redirects("meet.example.org")


def test_no_route_no_default() -> None:
    routes = HttpRoutes([HttpRoute(_up("a"), ("a.example.org",), (b"/x",))])
    assert routes.lookup("a.example.org", b"/") is None
    assert routes.lookup("b.example.org", b"/x") is None
    assert routes.serves("a.example.org") and not routes.serves(None)
