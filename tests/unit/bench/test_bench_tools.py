"""The load tools work end to end on loopback (tiny bounded runs, no timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench import ctools
from bench.cases import REPO_DIR, bench_env
from bench.hello import client_hello
from bench.procs import ProcessGroup, wait_port
from bench.templating import allocate_ports


@pytest.fixture
def port() -> int:
    return allocate_ports(["echo"], start=29500)["echo"]


def _echo_argv(kind: str, port: int, tools: dict[str, Path]) -> list[str]:
    if kind == "c":
        return [str(tools["tcpecho"]), str(port)]
    return [sys.executable, "-m", "bench.echo", "--port", str(port)]


@pytest.fixture(scope="module")
def c_tools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if ctools.compiler() is None:
        pytest.skip("no C compiler")
    tools, why = ctools.build(tmp_path_factory.mktemp("tools"))
    assert why is None, why
    return tools


@pytest.mark.parametrize("kind", ["python", "c"])
def test_conn_rate_client_against_echo(
    kind: str, port: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    tools = request.getfixturevalue("c_tools") if kind == "c" else {}
    hello_file = tmp_path / "hello.bin"
    hello_file.write_bytes(client_hello("bench.example.org")[0])
    with ProcessGroup(tmp_path) as group:
        echo = group.start("echo", _echo_argv(kind, port, tools), env=bench_env())
        wait_port(port, proc=echo)
        if kind == "c":
            argv = [str(tools["connrate"]), "127.0.0.1", str(port), "4", "5", "40", str(hello_file)]
        else:
            argv = [
                sys.executable,
                "-m",
                "bench.connrate",
                "--port",
                str(port),
                "--concurrency",
                "4",
                "--duration",
                "5",
                "--max-connections",
                "40",
            ]
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=bench_env(), cwd=REPO_DIR
        )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"] == 0, result
    assert result["connections"] == 40
    assert result["hello_bytes"] == hello_file.stat().st_size


def test_conn_rate_client_counts_refusals(
    port: int, c_tools: dict[str, Path], tmp_path: Path
) -> None:
    hello_file = tmp_path / "hello.bin"
    hello_file.write_bytes(b"x" * 10)
    # Nothing listens on `port`: every attempt is refused and counted, none succeeds.
    argv = [str(c_tools["connrate"]), "127.0.0.1", str(port), "2", "5", "20", str(hello_file)]
    result = json.loads(subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout)
    assert result["connections"] == 0
    assert result["failed"] == 20
    assert result["errors"] == {"ECONNREFUSED": 20}


def test_idlehold_opens_and_releases(port: int, tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        echo = group.start("echo", _echo_argv("python", port, {}), env=bench_env())
        wait_port(port, proc=echo)
        holder = subprocess.Popen(
            [sys.executable, "-m", "bench.idlehold", "--port", str(port), "--count", "25"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=bench_env(),
        )
        try:
            assert holder.stdout is not None and holder.stdin is not None
            ready = holder.stdout.readline()
            assert ready.startswith("READY ")
            assert json.loads(ready[6:])["open"] == 25
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "DONE"
            assert holder.wait(timeout=30) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
            holder.stdin.close()  # type: ignore[union-attr]
            holder.stdout.close()  # type: ignore[union-attr]
