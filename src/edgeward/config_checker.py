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
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from . import child_process
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
    with _Streams.open(path, read(path)) as pipes:
        try:
            proc = child_process.popen(_command(path), **pipes.popen_kwargs())
        except OSError as e:
            raise _failed(path, f"could not start: {e}") from None
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise _timed_out(path, timeout) from None
        finally:
            if proc.returncode is None:  # timed out (or interrupted): never leave it behind
                proc.kill()
                proc.wait()
        return _outcome(path, code, *pipes.output())


def load_checked_async(path: str | Path, timeout: float = TIMEOUT) -> Coroutine[Any, Any, Config]:
    """`load_checked` while the event loop keeps serving (for reloads). The file is read now (a
    ConfigError if it cannot be); what is returned checks that text when awaited, and raises
    ConfigError for its problems."""
    return _check(read(path), path, timeout)


async def _check(text: str, path: str | Path, timeout: float) -> Config:
    with _Streams.open(path, text) as pipes:
        try:
            proc = child_process.spawn(_command(path), asyncio.get_running_loop(), **pipes.popen_kwargs())
        except OSError as e:
            raise _failed(path, f"could not start: {e}") from None
        try:
            async with asyncio.timeout(timeout):
                code = await proc.wait()
        except TimeoutError:
            raise _timed_out(path, timeout) from None
        finally:
            if proc.returncode is None:  # timed out, or the reload was cancelled: never leave it behind
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        return _outcome(path, code, *pipes.output())


class _Streams:
    """The checker's standard input, output and error as in-memory files (memfd): the config text
    is written before it starts and what it wrote is read after it exits, so nothing waits on a
    pipe either way, and the event loop needs no reader for them."""

    def __init__(self, stdin: int, stdout: int, stderr: int) -> None:
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr

    @classmethod
    def open(cls, path: str | Path, text: str) -> _Streams:
        """The three files, `text` in the first; ConfigError (said like a checker that cannot
        start) when they cannot be made, e.g. out of descriptors."""
        fds: list[int] = []
        try:
            for name in ("edgeward-config", "edgeward-checked", "edgeward-checker-errors"):
                fds.append(os.memfd_create(name))
            view = memoryview(text.encode())
            while view:
                view = view[os.write(fds[0], view):]
            os.lseek(fds[0], 0, os.SEEK_SET)
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise _failed(path, f"could not start: {e}") from None
        return cls(*fds)

    def popen_kwargs(self) -> dict[str, int]:
        return {"stdin": self.stdin, "stdout": self.stdout, "stderr": self.stderr}

    def output(self) -> tuple[bytes, bytes]:
        """What the checker wrote on stdout and stderr (the child shares the files' offsets)."""
        out = []
        for fd in (self.stdout, self.stderr):
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            out.append(b"".join(chunks))
        return out[0], out[1]

    def __enter__(self) -> _Streams:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in (self.stdin, self.stdout, self.stderr):
            os.close(fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
