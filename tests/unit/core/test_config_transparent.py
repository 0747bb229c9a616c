"""Config of transparent mode: `transparent` on pools and services reaches the Forward actions."""

from __future__ import annotations

from edgeward.app import build_runtime, transparent_problems
from edgeward.config.loader import loads
from edgeward.net.forward import Forward
from edgeward.net.handoff import HandOff
from edgeward.net.transparent import pick_same_family, return_path_script, transparent_upstreams
from edgeward.upstream.pool import Upstreams

CONFIG = """
[pools.web]
servers = ["10.0.0.1:80", "[2001:db8::1]:80", "backend.example:80"]
transparent = true

[pools.plain]
servers = ["10.0.0.2:80"]

[handoffs.local]
socket = "/run/local.sock"

[services.a]
listen = ["127.0.0.1:8080"]
to = "web"

[services.b]
listen = ["127.0.0.1:8081"]
to = "web"
transparent = false

[services.c]
listen = ["127.0.0.1:8082"]
to = "plain"
transparent = true

[services.d]
listen = ["127.0.0.1:8083"]
to = "local"
fallback = "web"
"""


def test_transparent_from_pool_or_service() -> None:
    cfg = loads(CONFIG)
    actions = {r.service: r.action for r in build_runtime(cfg).routes}
    a, b, c, d = actions["a"], actions["b"], actions["c"], actions["d"]
    assert isinstance(a, Forward) and a.transparent
    assert isinstance(b, Forward) and not b.transparent  # the service's own setting wins
    assert isinstance(c, Forward) and c.transparent
    assert isinstance(d, HandOff) and d.fallback is not None and d.fallback.transparent
    assert set(transparent_upstreams(cfg)) == {"a", "c", "d"}
    assert transparent_problems(cfg) == []  # the tests run as root: the capability is there


def test_a_server_given_by_name_gets_an_unfiltered_rule() -> None:
    script = return_path_script(loads(CONFIG))
    assert "        socket transparent 1 meta mark set 0x7e" in script
    assert "saddr" not in script


def test_pick_same_family_skips_servers_of_the_other_family() -> None:
    cfg = loads(CONFIG)
    pool = Upstreams().pool("web", cfg.pools["web"])
    for _ in range(5):
        s, _skipped = pick_same_family(pool, "2001:db8::99", (), 0.0)
        assert s is not None and s.name == "[2001:db8::1]:80"
        s4, _ = pick_same_family(pool, "192.0.2.1", (), 0.0)
        assert s4 is not None and ":" not in (s4.target.host or "")
    only6 = Upstreams().pool("six", loads('[pools.six]\nservers = ["[2001:db8::1]:80"]\n').pools["six"])
    assert pick_same_family(only6, "192.0.2.1", (), 0.0) == (None, True)
