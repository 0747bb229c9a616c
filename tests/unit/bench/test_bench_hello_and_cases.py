"""The ClientHello the short-connection client sends, and small case helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bench.cases import (
    Context,
    _flatten,
    _last_json_line,
    ban_latency_args,
    jail_lines_args,
    observe_cost_args,
    run_script_case,
)
from bench.cli import cpu_plan, parse_args
from bench.hello import client_hello, own_client_hello
from bench.procs import ProcessGroup


def test_own_client_hello_is_one_well_formed_record() -> None:
    hello = own_client_hello("bench.example.org", ("h2", "http/1.1"))
    assert hello[:3] == b"\x16\x03\x01"
    assert int.from_bytes(hello[3:5], "big") == len(hello) - 5
    assert hello[5] == 1  # ClientHello
    assert int.from_bytes(hello[6:9], "big") == len(hello) - 9
    assert b"bench.example.org" in hello and b"http/1.1" in hello


def test_own_client_hello_parses_with_edgewards_codec() -> None:
    tls = pytest.importorskip("edgeward.codec.tls")
    parsed = tls.parse_client_hello(own_client_hello("bench.example.org", ("h2",)))
    assert parsed.sni == "bench.example.org"
    assert parsed.alpn == ("h2",)
    assert 0x0304 in parsed.supported_versions


def test_client_hello_carries_the_sni() -> None:
    hello, builder = client_hello("bench.example.org")
    assert b"bench.example.org" in hello
    assert builder in {"edgeward.codec.testing", "bench.hello"}


def test_last_json_line_and_flatten() -> None:
    out = "[sshd] 1 lines/s\n{not json\n" + '{"a": {"b": 1, "c": {"d": 2}}, "e": "x"}\n'
    doc = _last_json_line(out)
    assert doc == {"a": {"b": 1, "c": {"d": 2}}, "e": "x"}
    assert _flatten(doc) == {"a.b": 1, "a.c.d": 2, "e": "x"}
    assert _last_json_line("no json here") is None


def test_jail_lines_args_only_passes_offered_options() -> None:
    assert jail_lines_args("ap.add_argument('--lines')", quick=True) == ["--lines", "200000"]
    assert jail_lines_args("", quick=True) == []
    assert "--quick" in jail_lines_args("'--quick'", quick=True)
    assert "--quick" not in jail_lines_args("'--quick'", quick=False)


def test_parse_args_rounds() -> None:
    assert parse_args([]).rounds == 3
    assert parse_args(["--quick"]).rounds == 1
    assert parse_args(["--quick", "--rounds", "2"]).rounds == 2
    assert parse_args(["--cases", "tcp_bulk,conn_rate"]).case_list == ["tcp_bulk", "conn_rate"]
    with pytest.raises(SystemExit):
        parse_args(["--cases", "nope"])
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])


def test_cpu_plan() -> None:
    client, rest, cases, text = cpu_plan("off")
    assert client is None and rest is None and not cases and "off" in text
    client, rest, cases, _ = cpu_plan("auto")
    if len(os.sched_getaffinity(0)) >= 2:
        assert client and rest and not (client & rest)
        assert cases == {
            "conn_rate",
            "idle_memory",
            "http_keepalive",
            "https_keepalive",
            "tls_handshakes",
            "http_idle_memory",
        }
        assert cpu_plan("all")[2] >= {"tcp_bulk", "conn_rate", "idle_memory"}
    else:
        assert client is None and not cases


def test_context_cpus_only_for_pinned_cases(tmp_path: Path) -> None:
    ctx = Context(
        group=ProcessGroup(tmp_path),
        contestants=[],
        ports={},
        workdir=tmp_path,
        rounds=1,
        quick=True,
        client_cpus={1},
        upstream_cpus={0},
        proxy_cpus={0},
        pinned_cases=frozenset({"conn_rate"}),
    )
    assert ctx.cpus("client", "conn_rate") == {1}
    assert ctx.cpus("proxy", "conn_rate") == {0}
    assert ctx.cpus("client", "tcp_bulk") is None


def test_script_case_records_every_number_and_failures(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(
        "import json\nprint('progress 1/1')\n"
        "print(json.dumps({'case': 'x', 'p50_ms': 1.5, 'nested': {'n': 2}, 'ok': True}))\n"
    )
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    ctx = Context(
        group=ProcessGroup(tmp_path),
        contestants=[],
        ports={},
        workdir=tmp_path,
        rounds=2,
        quick=True,
        log=lambda _msg: None,
    )
    run_script_case(ctx, "good", good)
    run_script_case(ctx, "bad", bad)
    assert [r["metrics"] for r in ctx.runs["good"]] == [{"p50_ms": 1.5, "nested.n": 2.0}] * 2
    assert all("exit 3" in r["error"] and "boom" in r["error"] for r in ctx.runs["bad"])


def test_ban_latency_args() -> None:
    assert ban_latency_args("ap.add_argument('--rounds')", quick=True) == ["--rounds", "50"]
    assert ban_latency_args("ap.add_argument('--rounds')", quick=False) == []


def test_observe_cost_args() -> None:
    assert observe_cost_args("ap.add_argument('--quick')", quick=True) == ["--quick"]
    assert observe_cost_args("ap.add_argument('--quick')", quick=False) == []
    assert observe_cost_args("no such option", quick=True) == []
