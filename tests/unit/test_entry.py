"""`edgeward run` goes to the daemon without the CLI's libraries (entry.py, daemon.py); everything
else, and run's --help or a mistyped option, to the full CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer

from edgeward.cli import app
from edgeward.daemon import RUN_OPTIONS, WORKER_OPTIONS, parse_run, parse_worker


@pytest.mark.parametrize(("command", "options"), [("run", RUN_OPTIONS), ("worker", WORKER_OPTIONS)])
def test_the_fast_path_knows_exactly_the_options_of_the_cli_command(command: str, options: tuple[str, ...]) -> None:
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    assert opts - {"--help"} == set(options)


def test_parse_worker() -> None:
    assert parse_worker(["--control-fd", "5", "--index", "1", "e.toml"]) == ("e.toml", 5, 1, None)
    assert parse_worker(["e.toml", "--control-fd", "7", "--log-level", "debug"]) == ("e.toml", 7, 0, "debug")
    assert parse_worker(["e.toml"]) is None  # no control socket: the CLI says so
    assert parse_worker(["--control-fd", "x", "e.toml"]) is None
    assert parse_worker(["--control-fd"]) is None


@pytest.mark.parametrize(("args", "parsed"), [
    (["edge.toml"], ("edge.toml", False, None)),
    (["--demo", "edge.toml"], ("edge.toml", True, None)),
    (["edge.toml", "--log-level", "debug", "--no-demo"], ("edge.toml", False, "debug")),
    (["--log-level=warning", "edge.toml"], ("edge.toml", False, "warning")),
    ([], None),  # the CLI says the config is missing
    (["--help"], None),
    (["edge.toml", "other.toml"], None),
    (["edge.toml", "--log-level"], None),
    (["--demo-mode", "edge.toml"], None),
])
def test_parse_run(args: list[str], parsed: tuple[str, bool, str | None] | None) -> None:
    assert parse_run(args) == parsed


def edgeward(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as installed, reporting at exit whether the CLI's libraries were loaded."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('loaded:', sorted(m for m in ('typer', 'click', 'rich', 'http.client')"
            " if m in sys.modules), file=sys.stderr))\n"
            f"sys.argv = ['edgeward', *{list(args)!r}]\n"
            "from edgeward.entry import main\nmain()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_run_reports_config_problems_without_the_cli_libraries(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text('[services.web]\nlisten = [":8080"]\nto = "127.0.0.1:9"\ntimeout = 3\n')
    r = edgeward("run", str(cfg))
    assert r.returncode == 2
    assert f"{cfg}:4:1" in r.stderr and "1 problem(s) in" in r.stderr
    assert "loaded: []" in r.stderr


def test_a_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text('[services.web]\nlisten = ["127.0.0.1:0"]\nto = "127.0.0.1:9"\n')
    r = edgeward("run", str(cfg), "--log-level", "loud")
    assert r.returncode == 2 and "--log-level 'loud' is not one of" in r.stderr


def test_run_help_and_other_commands_go_to_the_cli(tmp_path: Path) -> None:
    r = edgeward("run", "--help")
    assert r.returncode == 0 and "SIGHUP reloads" in r.stdout and "'typer'" in r.stderr
    r = edgeward("--version")
    assert r.returncode == 0 and r.stdout.startswith("edgeward ")
