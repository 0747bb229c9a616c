"""`edgeward run`: load the config, set up logging, run the edge until it stops.

Kept apart from the CLI (cli.py) so that the daemon does not carry the CLI's libraries: typer and
click, the admin API's HTTP client, rich. `edgeward run` reaches this module without importing them
(entry.py), which keeps several MB out of a long-lived process on a small VPS.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2
LOG_LEVELS = ("debug", "info", "warning", "error")
RUN_OPTIONS = ("--demo", "--no-demo", "--log-level")  # cli.run's options, parsed here by parse_run
WORKER_OPTIONS = ("--control-fd", "--index", "--log-level")  # cli.worker's, parsed by parse_worker


def run(config: str | Path, demo: bool = False, log_level: str | None = None) -> int:
    """Run the edge in the foreground; the exit code (0 stopped, 1 cannot start, 2 bad config).

    The config is checked in a process of its own (config_checker.py), at start and at each
    reload, so that this long-lived process never imports pydantic."""
    _ignore_until_handled()
    from .app import StartError
    from .app import run as run_edge
    from .config.loader import ConfigError
    from .config_checker import load_checked, load_checked_async
    if log_level is not None and log_level.lower() not in LOG_LEVELS:
        print(f"edgeward: --log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        cfg = load_checked(config)
    except ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        print(f"{len(e.problems)} problem(s) in {config}", file=sys.stderr)
        return EXIT_CONFIG
    _log_to_stderr(log_level or cfg.edge.log_level)
    try:
        run_edge(str(config), cfg, demo, load_checked, load_checked_async)
    except StartError as e:
        print(f"edgeward: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def run_worker(config: str | Path, control_fd: int, index: int = 0, log_level: str | None = None) -> int:
    """A data-plane worker of `edgeward run` with [edge] workers > 1, started by the master
    (workers/master.py) with its end of the control socket; the exit code.

    It never reads `config` (the master's file name, for `ps`): the file may be mid-edit when a
    worker is restarted, and the worker runs the config the master checked, sent over the channel.
    The log level is the master's (--log-level)."""
    _ignore_until_handled()
    from .app import StartError, run_worker
    level = log_level.lower() if log_level is not None and log_level.lower() in LOG_LEVELS else "info"
    _log_to_stderr(level, f"[worker {index}]")
    try:
        run_worker(control_fd)
    except StartError as e:
        print(f"edgeward: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def _ignore_until_handled() -> None:
    """SIGHUP (reload) and SIGUSR1 (reopen logs) end a process by default. The loop handles them
    once the edge has started (its listeners bound, config checked: up to seconds); until then one
    sent by a deploy script or logrotate is ignored rather than killing an edge that is starting.
    A worker starts with them blocked (child_process): ignored now, they can be unblocked (one
    pending is dropped)."""
    for sig in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGHUP, signal.SIGUSR1))


def _log_to_stderr(level: str, tag: str = "") -> None:
    from .systemd import JournalFormatter, stderr_is_journal
    handler = logging.StreamHandler()
    # Under systemd, journald stamps the time and keeps each line's priority from its <N> prefix.
    handler.setFormatter(JournalFormatter() if stderr_is_journal()
                         else logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def parse_worker(args: list[str]) -> tuple[str, int, int, str | None] | None:
    """`worker`'s arguments as the master passes them (--control-fd N --index I --log-level L CONFIG), or None."""
    opts: dict[str, str] = {}
    config: str | None = None
    it = iter(args)
    for a in it:
        if a in WORKER_OPTIONS:
            value = next(it, None)
            if value is None:
                return None
            opts[a] = value
        elif a.startswith("-") or config is not None:
            return None
        else:
            config = a
    if config is None or "--control-fd" not in opts:
        return None
    try:
        return config, int(opts["--control-fd"]), int(opts.get("--index", "0")), opts.get("--log-level")
    except ValueError:
        return None


def parse_run(args: list[str]) -> tuple[str, bool, str | None] | None:
    """`run`'s arguments (after the word run) as (config, demo, log_level), or None for anything
    else (--help, a typo, a missing value), which the full CLI then answers with its own message.
    The options are those of cli.run; tests/unit/test_entry.py checks the two agree."""
    config: str | None = None
    demo = False
    log_level: str | None = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--demo":
            demo = True
        elif a == "--no-demo":
            demo = False
        elif a == "--log-level" and i + 1 < len(args):
            i += 1
            log_level = args[i]
        elif a.startswith("--log-level="):
            log_level = a.split("=", 1)[1]
        elif a.startswith("-") or config is not None:
            return None
        else:
            config = a
        i += 1
    return None if config is None else (config, demo, log_level)
