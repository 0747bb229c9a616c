"""The udp case: iperf3 -u JSON parsing (real iperf3 3.12 output captured on
loopback: `iperf3 -c 127.0.0.1 -u -b 0 -l 200 -t 1 -J` and `-b 80M`), its
command lines, metrics, the UDP listeners in the peer configs, and the table."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from bench.cases import CASES, METRICS, UDP_LEN, UDP_MODES, udp_argv, udp_metrics
from bench.cli import DEFAULT_CASES
from bench.contestants import contestant_ports, listeners, port_names, template_values
from bench.iperf import IperfError, parse_iperf_udp_json
from bench.report import markdown, summarize_results
from bench.templating import render_file

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["iperf3_udp_flat.json", "iperf3_udp_paced.json"])
def test_udp_reads_the_server_side_summary(name: str) -> None:
    text = (FIXTURES / name).read_text()
    received = json.loads(text)["end"]["sum_received"]
    r = parse_iperf_udp_json(text)
    assert r.blksize == 200
    assert r.packets == received["packets"]
    assert r.lost_packets == received["lost_packets"]
    assert r.lost_percent == received["lost_percent"]
    assert r.seconds == received["seconds"]
    assert r.send_seconds == json.loads(text)["end"]["sum_sent"]["seconds"]
    # Every datagram the server got carried 200 bytes: the two counts agree.
    assert r.received_packets == received["bytes"] // 200
    assert r.packets_per_s == pytest.approx(r.received_packets / r.send_seconds)


def test_udp_rate_is_per_second_of_sending() -> None:
    """A late end-of-test message on the TCP control (a proxy's Nagle delay) stretches
    the server's window; the rate must not drop for it."""
    doc = json.loads((FIXTURES / "iperf3_udp_paced.json").read_text())
    doc["end"]["sum_received"]["seconds"] = doc["end"]["sum_sent"]["seconds"] + 0.04
    late = parse_iperf_udp_json(json.dumps(doc))
    on_time = parse_iperf_udp_json((FIXTURES / "iperf3_udp_paced.json").read_text())
    assert late.packets_per_s == on_time.packets_per_s
    del doc["end"]["sum_sent"]  # older output without it: the server's window
    assert parse_iperf_udp_json(json.dumps(doc)).packets_per_s == pytest.approx(
        late.received_packets / late.seconds
    )


def test_udp_flat_and_paced_fixtures() -> None:
    flat = parse_iperf_udp_json((FIXTURES / "iperf3_udp_flat.json").read_text())
    paced = parse_iperf_udp_json((FIXTURES / "iperf3_udp_paced.json").read_text())
    assert flat.target_bitrate == 0
    assert paced.target_bitrate == 80_000_000
    # 80 Mbit/s of 200-byte payloads is 50,000 datagrams/s.
    assert paced.target_bitrate / (paced.blksize * 8) == 50_000
    assert paced.packets_per_s < 50_001


def test_udp_parser_refuses_a_tcp_test_and_errors() -> None:
    with pytest.raises(IperfError, match="not a UDP test"):
        parse_iperf_udp_json((FIXTURES / "iperf3_p1.json").read_text())
    with pytest.raises(IperfError, match="busy"):
        parse_iperf_udp_json(json.dumps({"error": "the server is busy running a test"}))
    with pytest.raises(IperfError):
        parse_iperf_udp_json("iperf3: error - unable to connect")
    with pytest.raises(IperfError):
        parse_iperf_udp_json(json.dumps({"start": {"test_start": {"protocol": "UDP"}}}))


def test_udp_argv() -> None:
    assert dict(UDP_MODES) == {"flat": "0", "paced": "80M"}
    argv = udp_argv(21001, "80M", 2)
    assert argv[:5] == ["iperf3", "-c", "127.0.0.1", "-p", "21001"]
    for opt, value in (("-b", "80M"), ("-l", str(UDP_LEN)), ("-t", "2")):
        assert argv[argv.index(opt) + 1] == value
    assert "-u" in argv and "-J" in argv


def test_udp_metrics() -> None:
    result = SimpleNamespace(packets_per_s=40_000.0, lost_percent=2.5, received_packets=80_000)
    m = udp_metrics("paced", result, proxy_cpu=0.8)
    assert m == {
        "udp_pps_paced": 40_000.0,
        "udp_loss_paced": 2.5,
        "cpu_s_per_1m_pkt_paced": pytest.approx(10.0),
    }
    assert set(udp_metrics("flat", result, None)) == {"udp_pps_flat", "udp_loss_flat"}
    assert all(name in METRICS for name in m)
    assert METRICS["udp_loss_flat"].better == "lower"
    assert "udp" in CASES and "udp" in DEFAULT_CASES


def test_udp_ports_and_listeners() -> None:
    names = port_names()
    assert "iperf_udp" in names and "nginx_udp" in names and "edgeward_udp" in names
    assert "haproxy_udp" not in names  # HAProxy 2.6 does not proxy UDP
    assert "udp" not in listeners("haproxy")
    ports = {name: 23000 + i for i, name in enumerate(names)}
    assert contestant_ports("direct", ports)["udp"] == ports["iperf_udp"]
    assert contestant_ports("edgeward", ports)["udp"] == ports["edgeward_udp"]
    assert "udp" not in contestant_ports("haproxy", ports)


def _ports() -> dict[str, int]:
    return {name: 23000 + i for i, name in enumerate(port_names())}


def test_edgeward_forwards_tcp_and_udp_on_the_udp_port(tmp_path: Path) -> None:
    import tomllib

    ports = _ports()
    cfg = render_file("edgeward.toml", template_values("edgeward", ports, tmp_path), tmp_path)
    service = tomllib.loads(cfg.read_text())["services"]["udp"]
    p = ports["edgeward_udp"]
    assert service["listen"] == [f"127.0.0.1:{p}", f"udp/127.0.0.1:{p}"]
    assert service["to"] == f"127.0.0.1:{ports['iperf_udp']}"


def test_nginx_forwards_tcp_and_udp_on_the_udp_port(tmp_path: Path) -> None:
    ports = _ports()
    values = template_values("nginx", ports, tmp_path)
    values["nginx_stream_module"] = ""  # whatever this machine's nginx needs
    text = render_file("nginx.conf", values, tmp_path).read_text()
    p = ports["nginx_udp"]
    assert f"listen 127.0.0.1:{p};" in text
    assert f"listen 127.0.0.1:{p} udp;" in text
    assert f"server 127.0.0.1:{ports['iperf_udp']};" in text
    udp_server = text.split(f"listen 127.0.0.1:{p} udp;")[1].split("}")[0]
    # Unlimited replies per session (no proxy_responses), idle end like edgeward's 60s.
    assert "proxy_timeout 60s;" in udp_server
    directives = [line.strip() for line in udp_server.splitlines() if line.strip()[:1] != "#"]
    assert not any(d.startswith("proxy_responses") for d in directives)


def test_haproxy_config_has_no_udp(tmp_path: Path) -> None:
    text = render_file(
        "haproxy.cfg", template_values("haproxy", _ports(), tmp_path), tmp_path
    ).read_text()
    # The bind addresses only (an HTTPS bind also names the certificate file, whose
    # path holds this test's name).
    binds = [line.split()[1] for line in text.splitlines() if line.strip().startswith("bind ")]
    assert binds and not any("udp" in b for b in binds)


def _udp_doc() -> dict[str, Any]:
    def run(c: str, **metrics: float) -> dict[str, Any]:
        return {"contestant": c, "round": 0, "metrics": metrics, "raw": {}}

    return {
        "meta": {
            "started": "2026-11-21 17:00:00Z",
            "command": "python -m bench --quick --cases udp",
            "rounds": 1,
            "environment": {"cpu_model": "Test CPU", "cpus": 2, "kernel": "6.1", "python": "3"},
        },
        "cases": {
            "udp": {
                "runs": [
                    run("direct", udp_pps_paced=50_000.0, udp_loss_paced=0.0),
                    run("nginx", udp_pps_paced=40_000.0, udp_loss_paced=20.0),
                    run("edgeward", udp_pps_paced=45_000.0, udp_loss_paced=10.0),
                ]
            }
        },
    }


def test_udp_rows_in_the_table() -> None:
    doc = summarize_results(_udp_doc())
    md = markdown(doc)
    row = next(line for line in md.splitlines() if "paced 50k/s" in line and "pkt/s" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Metric, direct, haproxy, nginx, edgeward, then edgeward / direct, haproxy, nginx.
    assert cells[1:5] == ["50,000", "—", "40,000", "45,000"]
    assert cells[5:] == ["0.90", "—", "1.12"]
    assert "HAProxy 2.6 does not proxy UDP" in md
    loss = next(line for line in md.splitlines() if "UDP loss, paced" in line)
    assert "↓" in loss
    # Loss 0 for direct: no ratio rather than a division by zero.
    assert [c.strip() for c in loss.strip("|").split("|")][5] == "—"


def test_a_port_busy_for_udp_only_is_not_free() -> None:
    import socket

    from bench.templating import port_is_free

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        assert not port_is_free(busy.getsockname()[1])
