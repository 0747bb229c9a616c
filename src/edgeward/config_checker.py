"""`edgeward run`'s config, checked in a short-lived process of its own.

Validating a config takes pydantic, whose validators for the whole schema cost the
process about 16 MB for as long as it lives; reading a validated config takes nothing
but the schema's frozen dataclasses. So the daemon (at start, and at each reload) reads
the file and gives its text to ``python -m edgeward.config_checker FILE`` on its standard
input; the checker makes exactly the checks of `edgeward check` (`app.load_config`:
schema, cross-checks, jails and filters, certificate files, kernel forwarding) and
writes the outcome pickled on its standard output: ``("config", Config)`` or
``("problems", [Problem, ...])``. The daemon unpickles it without importing pydantic,
and reports problems exactly as `check` does, at file:line:col.

The daemon reads the file itself, when the reload is asked: like a reload checked in
the daemon, each reload applies the file as it was at its SIGHUP (or API call), even
when an edit follows before the checker is done.

The checker is bounded in time (`TIMEOUT`: a filter or key file on a hung mount, a FIFO
named as a password file...) and its failure (killed, crashed) is a problem of its own,
said as such: a start fails, a reload keeps the running config.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import signal
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from .config.loader import ConfigError, Problem, read
from .config.schema import Config

TIMEOUT = 60.0  # seconds a check may take (a normal one takes well under one)


def main(argv: list[str]) -> int:
    """The checker process: check the config text on stdin, named argv[0] in problems; the
    outcome, pickled, on stdout."""
    if len(argv) != 1:
        print("usage: python -m edgeward.config_checker NAME < CONFIG", file=sys.stderr)
        return 2
    from .app import load_config_text
    text = sys.stdin.buffer.read().decode("utf-8")  # the daemon read it as UTF-8 already
    outcome: tuple[str, object]
    try:
        outcome = ("config", load_config_text(text, argv[0]))
    except ConfigError as e:
        outcome = ("problems", e.problems)
    sys.stdout.buffer.write(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()
    return 0


def _command(path: str | Path) -> list[str]:
    return [sys.executable, "-m", "edgeward.config_checker", str(path)]


def _outcome(path: str | Path, returncode: int, out: bytes, err: bytes) -> Config:
    """The Config the checker sent; ConfigError for the problems it found, or for its own failure."""
    if err:
        sys.stderr.write(err.decode(errors="replace"))  # whatever it said (warnings, a traceback) is not lost
    if returncode == 0 and out:
        try:
            kind, value = pickle.loads(out)  # our own child process, over a pipe
        except Exception as e:  # a truncated or foreign output: the checker is broken, not the config
            raise _failed(path, f"its output could not be read ({e})") from None
        if kind == "problems":
            raise ConfigError(value)
        if kind == "config" and isinstance(value, Config):
            return value
        raise _failed(path, f"it answered {kind!r}")
    if returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        lines = err.decode(errors="replace").strip().splitlines()
        how = f"exited with code {returncode}" + (f": {lines[-1]}" if lines else "")
    raise _failed(path, how)


def _failed(path: str | Path, how: str) -> ConfigError:
    return ConfigError([Problem(str(path), 1, 1, f"the config could not be checked: the checker process {how}",
                                "run `edgeward check " + str(path) + "` to see why")])


def _timed_out(path: str | Path, timeout: float) -> ConfigError:
    return _failed(path, f"did not finish within {timeout:g}s (a file it reads may hang: a FIFO, a stale mount)")


def load_checked(path: str | Path, timeout: float = TIMEOUT) -> Config:
    """The config at `path`, checked in a checker process (for the start). Raises ConfigError."""
    text = read(path)
    try:
        r = subprocess.run(_command(path), input=text.encode(), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # run() has killed and reaped it
        raise _timed_out(path, timeout) from None
    except OSError as e:
        raise _failed(path, f"could not start: {e}") from None
    return _outcome(path, r.returncode, r.stdout, r.stderr)


def load_checked_async(path: str | Path, timeout: float = TIMEOUT) -> Coroutine[Any, Any, Config]:
    """`load_checked` while the event loop keeps serving (for reloads). The file is read now (a
    ConfigError if it cannot be); what is returned checks that text when awaited, and raises
    ConfigError for its problems."""
    return _check(read(path), path, timeout)


async def _check(text: str, path: str | Path, timeout: float) -> Config:
    try:
        proc = await asyncio.create_subprocess_exec(*_command(path), stdin=subprocess.PIPE,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise _failed(path, f"could not start: {e}") from None
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(text.encode())
    except TimeoutError:
        raise _timed_out(path, timeout) from None
    finally:
        if proc.returncode is None:  # timed out, or the reload was cancelled: never leave it behind
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return _outcome(path, proc.returncode, out, err)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
