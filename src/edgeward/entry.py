"""The `edgeward` console script: `edgeward run ...` goes straight to the daemon (daemon.py), every
other command (and run's --help or a mistyped option) to the full CLI (cli.py, typer).

Why two doors: the CLI's libraries cost the daemon several MB of memory for its whole life and
serve no purpose once it runs."""

from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["run"]:
        from .daemon import parse_run
        from .daemon import run as run_daemon
        parsed = parse_run(args[1:])
        if parsed is not None:
            try:
                sys.exit(run_daemon(*parsed))
            except KeyboardInterrupt:
                sys.exit(130)
    elif args[:1] == ["worker"]:  # started by the master of `edgeward run` with [edge] workers > 1
        from .daemon import parse_worker, run_worker
        worker = parse_worker(args[1:])
        if worker is not None:
            try:
                sys.exit(run_worker(*worker))
            except KeyboardInterrupt:
                sys.exit(130)
    from .cli import main as cli_main
    cli_main()


if __name__ == "__main__":
    main()
