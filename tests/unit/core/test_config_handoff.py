"""Config of socket handoff: [handoffs.NAME] endpoints, `to` naming one, `fallback`; errors at file:line:col."""

from __future__ import annotations

import pytest

from edgeward.app import build_runtime
from edgeward.config.loader import ConfigError, loads
from edgeward.net.forward import Forward
from edgeward.net.handoff import HandOff

GOOD = """\
[handoffs.site]
socket = "/run/site/handoff.sock"
ack_timeout = "250ms"
max_in_flight = 8

[pools.backup]
servers = ["127.0.0.1:9443", "127.0.0.1:9444"]

[services.a]
listen = ["127.0.0.1:8443"]
names = ["a.example.org"]
to = "site"
fallback = "127.0.0.1:9443"

[services.b]
listen = ["127.0.0.1:8443"]
names = ["b.example.org"]
to = "site"
fallback = "backup"

[services.c]
listen = ["127.0.0.1:8443"]
names = ["c.example.org"]
to = "site"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        loads(text, "edge.toml")
    return [str(p) for p in ei.value.problems]


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def test_good_config_builds_handoff_routes() -> None:
    rt = build_runtime(loads(GOOD))
    routes = {r.service: r for r in rt.routes}
    a, b, c = routes["a"].action, routes["b"].action, routes["c"].action
    assert isinstance(a, HandOff) and isinstance(b, HandOff) and isinstance(c, HandOff)
    assert a.endpoint is b.endpoint is c.endpoint  # one endpoint, one in-flight bound
    assert a.endpoint.path == "/run/site/handoff.sock" and a.endpoint.ack_timeout == 0.25
    assert a.endpoint.max_in_flight == 8
    assert isinstance(a.fallback, Forward) and a.pool is not None and a.pool.name == "service:a"
    assert b.pool is rt.pools["backup"]
    assert c.fallback is None and c.pool is None
    assert a.kind == "handoff" and rt.listeners[("tcp", "127.0.0.1", 8443)].table.needs_sniff


def test_missing_socket_is_located() -> None:
    text = GOOD.replace('socket = "/run/site/handoff.sock"\n', "")
    (p,) = problems(text)
    assert p.startswith(f"edge.toml:{line_of(text, '[handoffs.site]')}:1: handoffs.site.socket: required option is missing")


def test_relative_socket_path_is_located() -> None:
    text = GOOD.replace('"/run/site/handoff.sock"', '"run/site.sock"')
    (p,) = problems(text)
    assert p.startswith(f"edge.toml:{line_of(text, 'socket =')}:10: handoffs.site.socket:") and "absolute" in p


def test_bad_ack_timeout_and_bound() -> None:
    text = GOOD.replace('ack_timeout = "250ms"', 'ack_timeout = "soon"').replace("max_in_flight = 8", "max_in_flight = 0")
    ps = problems(text)
    assert any(p.startswith(f"edge.toml:{line_of(text, 'ack_timeout')}:15:") and "duration" in p for p in ps), ps
    assert any(p.startswith(f"edge.toml:{line_of(text, 'max_in_flight')}:17:") for p in ps), ps


def test_unknown_fallback_pool_did_you_mean() -> None:
    text = GOOD.replace('fallback = "backup"', 'fallback = "bakup"')
    (p,) = problems(text)
    assert p.startswith(f"edge.toml:{line_of(text, 'bakup')}:12: fallback: no pool named 'bakup'")  # at the value
    assert "did you mean 'backup'?" in p


def test_fallback_without_handoff_is_an_error() -> None:
    text = GOOD + '\n[services.d]\nlisten = ["127.0.0.1:8443"]\nnames = ["d.example.org"]\nto = "127.0.0.1:1"\n' \
                  'fallback = "127.0.0.1:2"\n'
    (p,) = problems(text)
    line = line_of(text, "127.0.0.1:2")
    assert p.startswith(f"edge.toml:{line}:12:") and "not a [handoffs]" in p


def test_fallback_must_relay() -> None:
    ps = problems(GOOD.replace('fallback = "127.0.0.1:9443"', 'fallback = "https://127.0.0.1:9443"'))
    assert any("HTTP upstream" in p for p in ps), ps
    ps = problems(GOOD.replace('fallback = "127.0.0.1:9443"', 'fallback = "site"'))
    assert any("is a handoff endpoint" in p for p in ps), ps


def test_handoff_cannot_listen_on_udp() -> None:
    (p,) = problems(GOOD.replace('listen = ["127.0.0.1:8443"]\nnames = ["c.example.org"]',
                                 'listen = ["udp/127.0.0.1:8443"]'))
    assert "hands off TCP sockets but listens on UDP" in p


def test_name_of_both_a_pool_and_an_endpoint() -> None:
    ps = problems(GOOD + '\n[pools.site]\nservers = ["127.0.0.1:1"]\n')
    assert any("both a pool and a handoff endpoint" in p for p in ps), ps
