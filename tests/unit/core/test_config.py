"""Config: units, schema, located errors, cross-checks, every example file."""

from pathlib import Path

import pytest

from edgeward.app import build_runtime
from edgeward.config.loader import ConfigError, loads
from edgeward.config.schema import json_schema
from edgeward.config.units import parse_bind, parse_duration, parse_size, parse_target

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("5s", 5), ("5m", 300), ("1h", 3600), ("1d", 86400),
                                               (7, 7.0), ("-1", -1.0), ("1.5s", 1.5)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5 minutes", "", "s", True, "5x", None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_sizes() -> None:
    assert parse_size("64KiB") == 65536
    assert parse_size("1MiB") == 1 << 20
    assert parse_size(100) == 100
    with pytest.raises(ValueError):
        parse_size("lots")


def test_binds() -> None:
    b = parse_bind("[::]:443")
    assert (b.transport, b.host, b.first_port, b.last_port) == ("tcp", "::", 443, 443)
    r = parse_bind("udp/0.0.0.0:10000-10100")
    assert r.transport == "udp" and len(r.ports()) == 101
    for bad in ["443", "example.org:443", "[::1:443", "0.0.0.0:70000", "0.0.0.0:10-5", "0.0.0.0:1-9000"]:
        with pytest.raises(ValueError):
            parse_bind(bad)


def test_targets() -> None:
    assert parse_target("10.0.0.2:5222").port == 5222
    assert parse_target("10.0.0.2").port is None
    assert parse_target("[2001:db8::1]:443").host == "2001:db8::1"
    assert parse_target("unix:/run/x.sock").unix_path == "/run/x.sock"
    with pytest.raises(ValueError):
        parse_target("unix:relative.sock")


GOOD = """
[edge]
admin = "unix:/tmp/x/admin.sock"

[listeners.public]
bind = ["127.0.0.1:8443"]
trusted_proxies = ["127.0.0.1"]

[pools.web]
servers = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 2 }]
balance = "source-hash"
health = { http = "/about/health", interval = "2s" }

[services.a]
listen = ["public"]
names = ["A.example.org."]
to = "web"

[services.b]
listen = ["public", "127.0.0.1:5222"]
to = "127.0.0.1"
"""


def test_good_config_builds_runtime() -> None:
    cfg = loads(GOOD, "good.toml")
    assert cfg.services["a"].names == ["a.example.org"]
    rt = build_runtime(cfg)
    assert {k[2] for k in rt.listeners} == {8443, 5222}
    assert rt.listeners[("tcp", "127.0.0.1", 8443)].table.needs_sniff


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        loads(text, "edge.toml")
    return [str(p) for p in ei.value.problems]


def test_unknown_pool_did_you_mean_with_location() -> None:
    text = GOOD.replace('to = "web"', 'to = "wbe"')
    (p,) = problems(text)
    line = text.splitlines().index('to = "wbe"') + 1
    assert p.startswith(f"edge.toml:{line}:6: to: no pool named 'wbe'")  # at the value
    assert "did you mean 'web'?" in p


def test_bad_duration_is_located() -> None:
    text = GOOD.replace('interval = "2s"', 'interval = "two seconds"')
    (p,) = problems(text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "two seconds" in ln)
    assert p.startswith(f"edge.toml:{line}:") and "duration" in p


def test_port_given_twice() -> None:
    text = GOOD + '\n[listeners.again]\nbind = ["127.0.0.1:8443"]\n'
    ps = problems(text)
    assert any("given twice" in p for p in ps)


def test_inline_address_owned_by_named_listener() -> None:
    ps = problems(GOOD.replace('listen = ["public", "127.0.0.1:5222"]', 'listen = ["127.0.0.1:8443"]'))
    assert any("already bound" in p for p in ps)


def test_unknown_key_and_typo_in_listener_name() -> None:
    ps = problems(GOOD.replace("balance =", "balnce =").replace('listen = ["public"]', 'listen = ["pubic"]'))
    assert any("balnce" in p and "unknown option" in p and "did you mean 'balance'" in p for p in ps)


def test_listener_name_typo_is_reported_after_schema_passes() -> None:
    ps = problems(GOOD.replace('listen = ["public"]', 'listen = ["pubic"]'))
    assert any("did you mean 'public'" in p for p in ps)


def test_two_defaults_on_one_listener_are_ambiguous() -> None:
    ps = problems(GOOD + '\n[services.c]\nlisten = ["public"]\nto = "127.0.0.1:9"\n')
    assert any("both take" in p for p in ps)


def test_admin_must_be_loopback_without_token() -> None:
    ps = problems(GOOD.replace('admin = "unix:/tmp/x/admin.sock"', 'admin = "0.0.0.0:9901"'))
    assert any("admin_token" in p for p in ps)
    loads(GOOD.replace('admin = "unix:/tmp/x/admin.sock"', 'admin = "0.0.0.0:9901"\nadmin_token = "s3cret"'))


def test_toml_syntax_error_is_located() -> None:
    (p,) = problems("[edge\nadmin = 1\n")
    assert p.startswith("edge.toml:1:") and "TOML syntax" in p


UDP = """
[edge]
admin = "unix:/tmp/x/admin.sock"

[listeners.relay]
bind = ["udp/0.0.0.0:49152-49161"]
udp_idle_timeout = "30s"

[pools.bridges]
servers = ["10.0.0.11", "10.0.0.12"]
balance = "source-hash"

[services.turn]
listen = ["[::]:3478", "udp/[::]:3478", "relay"]   # TCP and UDP on one port is fine
to = "10.0.0.2"

[services.media]
listen = ["udp/0.0.0.0:10000"]
to = "bridges"
"""


def test_udp_services_build_a_runtime() -> None:
    rt = build_runtime(loads(UDP, "udp.toml"))
    assert ("udp", "::", 3478) in rt.listeners and ("tcp", "::", 3478) in rt.listeners
    relay = rt.listeners[("udp", "0.0.0.0", 49152)]
    assert relay.name == "relay" and relay.settings.udp_idle_timeout == 30
    assert rt.listeners[("udp", "0.0.0.0", 10000)].settings.udp_idle_timeout == 60
    assert len([k for k in rt.listeners if k[0] == "udp"]) == 12


def test_udp_cannot_be_routed_by_name_protocol_or_alpn() -> None:
    for extra in ('names = ["turn.example.org"]', 'protocol = "tls"', 'alpn = ["stun.turn"]'):
        ps = problems(UDP.replace('to = "bridges"', f'to = "bridges"\n{extra}'))
        assert len(ps) == 1 and "routed by source address only" in ps[0], ps
        assert "udp/0.0.0.0:10000" in ps[0]
    loads(UDP.replace('to = "bridges"', 'to = "bridges"\nsource = ["192.0.2.0/24"]'))  # source is fine


def test_udp_sends_no_proxy_headers_nor_goes_to_unix_sockets() -> None:
    (p,) = problems(UDP.replace('balance = "source-hash"', 'balance = "source-hash"\nproxy_protocol = "v2"'))
    assert "does not send over UDP" in p
    loads(UDP.replace('balance = "source-hash"', 'balance = "source-hash"\nproxy_protocol = "v2"')
          .replace('to = "bridges"', 'to = "bridges"\nproxy_protocol = "off"'))
    (p,) = problems(UDP.replace('to = "10.0.0.2"', 'to = "unix:/run/turn.sock"'))
    assert "unix socket" in p


def test_udp_bind_given_twice_is_an_error() -> None:
    ps = problems(UDP.replace('bind = ["udp/0.0.0.0:49152-49161"]', 'bind = ["udp/0.0.0.0:49152-49161", "udp/0.0.0.0:49160"]'))
    assert any("udp port 0.0.0.0:49160 is given twice" in p for p in ps), ps
    ps = problems(UDP.replace('listen = ["udp/0.0.0.0:10000"]', 'listen = ["udp/0.0.0.0:10000", "udp/0.0.0.0:9990-10005"]'))
    assert any("listens on udp 0.0.0.0:10000 twice" in p for p in ps), ps
    ps = problems(UDP.replace('listen = ["udp/0.0.0.0:10000"]', 'listen = ["udp/0.0.0.0:49155"]'))
    assert any("already bound by a [listeners] table" in p for p in ps), ps
    ps = problems(UDP + '[services.again]\nlisten = ["udp/0.0.0.0:10000"]\nto = "10.0.0.3"\n')
    assert any("both take" in p for p in ps), ps
    ps = problems(UDP.replace('udp_idle_timeout = "30s"', 'udp_idle_timeout = "30s"\ntrusted_proxies = ["10.0.0.0/8"]'))
    assert any("never carry PROXY headers" in p for p in ps), ps


def test_json_schema_describes_every_section() -> None:
    s = json_schema()
    assert {"edge", "listeners", "pools", "services"} <= set(s["properties"])  # type: ignore[operator]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    from edgeward.config.loader import load
    cfg = load(path)
    build_runtime(cfg)


def test_check_names_a_certificate_file_that_cannot_be_served(tmp_path: Path) -> None:
    from edgeward.app import load_config
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f"""[tls]
certificates = [{{ cert = "{tmp_path / 'missing.pem'}", key = "{tmp_path / 'missing.key'}" }}]
[services.web]
listen = ["127.0.0.1:8443"]
names = ["web.test"]
to = "http://127.0.0.1:8080"
""")
    with pytest.raises(ConfigError) as ei:
        load_config(cfg)
    (p,) = ei.value.problems
    assert p.line == 2 and "missing.pem: certificate file not found" in p.message


# --- the messages of common mistakes (issue 11): each at the right line, with a fix -------------


def test_misspelt_table_is_reported_at_its_header_with_did_you_mean() -> None:
    text = '[edge]\nadmin = "127.0.0.1:9901"\n\n[service.web]\nlisten = ["127.0.0.1:8080"]\nto = "127.0.0.1:9"\n'
    assert problems(text) == ["edge.toml:4:1: unknown table [service] (did you mean [services]?)"]


def test_unknown_option_gets_did_you_mean_or_the_options_of_its_table() -> None:
    text = '[edge]\namdin = "127.0.0.1:9901"\n[services.web]\nlisten = ["127.0.0.1:8080"]\nto = "127.0.0.1:9"\nxyzzy = 1\n'
    assert problems(text) == [
        "edge.toml:2:1: unknown option 'amdin' in [edge] (did you mean 'admin'?)",
        "edge.toml:6:1: unknown option 'xyzzy' in [services.web] (options here: listen, names, protocol, alpn, "
        "source, to, fallback, proxy_protocol, transparent, connect_timeout, paths, upstream_tls, forward, "
        "masquerade)",
    ]


def test_a_string_where_a_list_is_expected_says_to_write_a_list() -> None:
    text = '[services.web]\nlisten = "127.0.0.1:8080"\nnames = "a.example.org"\nto = "127.0.0.1:9"\n'
    assert problems(text) == [
        'edge.toml:2:10: services.web.listen: a list is expected, not a single value (write listen = ["127.0.0.1:8080"])',
        'edge.toml:3:9: services.web.names: a list is expected, not a single value (write names = ["a.example.org"])',
    ]


def test_port_out_of_range_is_said_once_without_an_unrelated_hint() -> None:
    listen = '[services.web]\nlisten = ["127.0.0.1:80800"]\nto = "127.0.0.1:9"\n'
    assert problems(listen) == [
        "edge.toml:2:10: services.web.listen: '127.0.0.1:80800': port 80800 is out of range (1-65535)"]
    server = '[services.web]\nlisten = ["127.0.0.1:8080"]\nto = "p"\n[pools.p]\nservers = ["127.0.0.1:99999"]\n'
    assert problems(server) == ["edge.toml:5:11: pools.p.servers: '127.0.0.1:99999': port 99999 is out of range (1-65535)"]
    assert problems(listen.replace("80800", "http")) == [
        "edge.toml:2:10: services.web.listen: '127.0.0.1:http': port 'http' is not a number"]
