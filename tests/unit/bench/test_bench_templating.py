"""Config templating and the configs every contestant gets."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest
from bench import contestants
from bench.contestants import contestant_ports, port_names, template_values
from bench.templating import (
    CONFIG_DIR,
    PORT_RANGE,
    TemplateError,
    allocate_ports,
    holes,
    render,
    render_file,
)


def test_render_fills_holes_and_leaves_nginx_variables_alone() -> None:
    text = "listen {{port}}; map $ssl_preread_server_name $x { {{ name }} y; }"
    out = render(text, {"port": 21000, "name": "a.example"})
    assert out == "listen 21000; map $ssl_preread_server_name $x { a.example y; }"


def test_render_refuses_missing_values() -> None:
    with pytest.raises(TemplateError, match="echo_port"):
        render("to {{echo_port}} and {{iperf_port}}", {"iperf_port": 1})


def test_holes() -> None:
    assert holes("{{a}} {{ b }} {c} $d") == {"a", "b"}


@pytest.fixture
def ports() -> dict[str, int]:
    # Fixed numbers: rendering must not depend on what is free on this machine.
    return {name: 22000 + i for i, name in enumerate(port_names())}


@pytest.fixture(autouse=True)
def no_nginx_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rendering is tested without running `nginx -V`.
    monkeypatch.setattr(
        contestants, "nginx_stream_module_line", lambda: "load_module /x/ngx_stream_module.so;"
    )


def test_every_template_renders_completely(ports: dict[str, int], tmp_path: Path) -> None:
    names = {p.name.removesuffix(".tmpl") for p in CONFIG_DIR.glob("*.tmpl")}
    assert names == {"haproxy.cfg", "nginx.conf", "edgeward.toml", "nginx-upstream.conf"}
    for proxy, name in (
        ("haproxy", "haproxy.cfg"),
        ("nginx", "nginx.conf"),
        ("edgeward", "edgeward.toml"),
    ):
        out = render_file(name, template_values(proxy, ports, tmp_path), tmp_path).read_text()
        assert holes(out) == set()
        for case in ("bulk", "rate", "idle"):
            assert f"127.0.0.1:{ports[f'{proxy}_{case}']}" in out
        assert f"127.0.0.1:{ports['echo']}" in out
        assert f"127.0.0.1:{ports['iperf']}" in out
    upstream = render_file(
        "nginx-upstream.conf", template_values("nginx-upstream", ports, tmp_path), tmp_path
    ).read_text()
    assert holes(upstream) == set()
    assert f"127.0.0.1:{ports['http_upstream']}" in upstream
    assert f"127.0.0.1:{ports['https_upstream']} ssl" in upstream


def test_every_proxy_has_the_http_listeners(ports: dict[str, int], tmp_path: Path) -> None:
    for proxy, name in (
        ("haproxy", "haproxy.cfg"),
        ("nginx", "nginx.conf"),
        ("edgeward", "edgeward.toml"),
    ):
        out = render_file(name, template_values(proxy, ports, tmp_path), tmp_path).read_text()
        for listener in ("http", "https", "ws"):
            assert f"127.0.0.1:{ports[f'{proxy}_{listener}']}" in out
        assert f"127.0.0.1:{ports['http_upstream']}" in out
        assert f"127.0.0.1:{ports['ws_upstream']}" in out
        assert str(tmp_path / "bench-cert") in out


def test_edgeward_http_config(ports: dict[str, int], tmp_path: Path) -> None:
    path = render_file("edgeward.toml", template_values("edgeward", ports, tmp_path), tmp_path)
    doc = tomllib.loads(path.read_text())
    assert doc["tls"]["certificates"] == [
        {"cert": str(tmp_path / "bench-cert.pem"), "key": str(tmp_path / "bench-key.pem")}
    ]
    assert doc["tls"]["default_certificate"] == "bench.test"
    assert doc["acme"]["enabled"] is False  # nothing leaves loopback
    assert doc["http"]["redirect"] == "off"
    assert doc["http"]["upstream_keepalive"] == 64
    services = doc["services"]
    upstream = f"http://127.0.0.1:{ports['http_upstream']}"
    # One service on both listeners: TLS clients terminated, plain ones served plain.
    assert services["web"] == {"listen": [f"127.0.0.1:{ports['edgeward_http']}", f"127.0.0.1:{ports['edgeward_https']}"],
                               "to": upstream}
    assert services["ws"]["to"] == f"http://127.0.0.1:{ports['ws_upstream']}"


def test_upstream_body_is_100_bytes() -> None:
    assert len(contestants.HTTP_BODY) == 100
    assert contestants.HTTP_BODY.endswith(b"\n")
    # It goes into an nginx quoted string: nothing nginx would interpret.
    assert not set(contestants.HTTP_BODY_LINE) & set('"$\\{};')


def test_edgeward_config_sniffs_sni_for_the_rate_case(
    ports: dict[str, int], tmp_path: Path
) -> None:
    path = render_file("edgeward.toml", template_values("edgeward", ports, tmp_path), tmp_path)
    doc = tomllib.loads(path.read_text())
    services = doc["services"]
    assert services["rate"]["names"] == ["bench.example.org"]
    assert services["rate"]["to"] == f"127.0.0.1:{ports['echo']}"
    assert services["bulk"]["to"] == f"127.0.0.1:{ports['iperf']}"
    assert "names" not in services["idle"]
    # 9,000 connections from one client address must not hit the per-client cap.
    assert doc["edge"]["max_connections_per_client"] >= 9000


def test_peer_configs_are_tuned_fairly(ports: dict[str, int], tmp_path: Path) -> None:
    haproxy = render_file("haproxy.cfg", template_values("haproxy", ports, tmp_path), tmp_path)
    nginx = render_file("nginx.conf", template_values("nginx", ports, tmp_path), tmp_path)
    h, n = haproxy.read_text(), nginx.read_text()
    # One thread / one worker, like edgeward's single default process.
    assert "nbthread 1" in h
    assert "worker_processes 1;" in n
    # Tuned buffers, with the defaults said next to them.
    assert "tune.bufsize 65536" in h and "16384" in h
    assert "proxy_buffer_size 64k;" in n and "16k" in n
    # Same SNI work as edgeward.
    assert "req.ssl_sni -i bench.example.org" in h
    assert "ssl_preread on;" in n
    assert n.startswith("#") and "load_module /x/ngx_stream_module.so;" in n
    # HTTP: a pooled, keep-alive upstream for every proxy, no per-connection request cap.
    assert "http-reuse always" in h and "mode http" in h and "default `http-reuse safe`" in h
    assert "keepalive 64;" in n and 'proxy_set_header Connection "";' in n
    assert "keepalive_requests 1000000;" in n and "Defaults are 1000" in n
    # Idle keep-alive clients and websockets outlive the idle-memory measurement.
    assert "timeout http-keep-alive 1h" in h and "timeout tunnel 1h" in h
    assert "proxy_read_timeout 1h;" in n and "keepalive_timeout 1h;" in n


def test_contestant_ports_direct_goes_to_upstreams(ports: dict[str, int]) -> None:
    assert contestant_ports("direct", ports) == {
        "bulk": ports["iperf"],
        "rate": ports["echo"],
        "idle": ports["echo"],
        "udp": ports["iperf_udp"],
        "http": ports["http_upstream"],
        "https": ports["https_upstream"],
        "ws": ports["ws_upstream"],
    }
    assert contestant_ports("nginx", ports)["rate"] == ports["nginx_rate"]


def test_allocate_ports_skips_busy_ports() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        start = taken if taken in PORT_RANGE else None
        got = allocate_ports(["a", "b", "c"], start=start or 29000)
    assert len(set(got.values())) == 3
    assert all(p in PORT_RANGE for p in got.values())
    if start is not None:
        assert taken not in got.values()


def test_allocate_ports_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError):
        allocate_ports(["a", "a"])


def test_listeners_are_the_ports_a_template_offers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy template without the HTTP holes (edgeward's before its HTTP edge) opens
    # no HTTP listener, so the harness neither waits for one nor measures it.
    (tmp_path / "edgeward.toml.tmpl").write_text(
        'listen = ["127.0.0.1:{{bulk_port}}"]\nto = "{{iperf_port}}"\n'
    )
    monkeypatch.setattr(contestants, "CONFIG_DIR", tmp_path)
    assert contestants.listeners("edgeward") == ("bulk",)
    assert contestants.listeners("direct") == ()
