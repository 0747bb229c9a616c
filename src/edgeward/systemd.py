"""Running under systemd: sd_notify(3) readiness, reload and status, the watchdog, journald priorities.

The protocol is a datagram of `KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET
(an abstract one when it starts with "@"); written here rather than taken from libsystemd
(python-systemd needs its C library and headers, and this is a dozen lines). Outside systemd
(no $NOTIFY_SOCKET) nothing here does anything.

- READY=1 once listeners are bound, bans restored and the admin API is up (`Type=notify`);
- RELOADING=1 (with MONOTONIC_USEC, as `Type=notify-reload` of systemd 253+ wants) then READY=1
  around a reload, STOPPING=1 when draining starts;
- STATUS= a one-line summary, refreshed every few seconds;
- WATCHDOG=1 at half of $WATCHDOG_USEC, from the event loop itself: a stuck loop stops the
  pings and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("edgeward.systemd")

STATUS_EVERY = 5.0  # seconds between STATUS= refreshes


class Notifier:
    """Sends sd_notify messages to one socket; never raises (systemd going away is not our failure)."""

    def __init__(self, address: str) -> None:
        # "@name" is an abstract socket: a leading NUL byte on Linux.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.failed = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier | None:
        address = env.get("NOTIFY_SOCKET")
        return cls(address) if address else None

    def send(self, **fields: str | int) -> bool:
        text = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        try:
            self.sock.sendto(text.encode(), self.address)
            return True
        except OSError as e:
            if not self.failed:
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), e)
                self.failed = True
            return False

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status)

    def reloading(self) -> None:
        self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(stopping=1)

    def close(self) -> None:
        self.sock.close()


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Half of $WATCHDOG_USEC when it is meant for this process (sd_watchdog_enabled(3)), else None."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Supervision:
    """The edge's side of systemd: ready, reload, stop, status and watchdog (see the module doc)."""

    def __init__(self, notifier: Notifier, summary: Callable[[], str], watchdog: float | None) -> None:
        self.notifier = notifier
        self.summary = summary
        self.watchdog = watchdog
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls, summary: Callable[[], str]) -> Supervision | None:
        notifier = Notifier.from_env()
        return cls(notifier, summary, watchdog_interval()) if notifier is not None else None

    def ready(self) -> None:
        self.notifier.ready(self.summary())
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._beat())

    def reloading(self) -> None:
        self.notifier.reloading()

    def reloaded(self) -> None:
        self.notifier.ready(self.summary())

    def stopping(self) -> None:
        self.notifier.stopping()

    async def _beat(self) -> None:
        """Watchdog pings and STATUS= refreshes, on the event loop."""
        every = min(self.watchdog or STATUS_EVERY, STATUS_EVERY)
        next_status = time.monotonic() + STATUS_EVERY
        while True:
            await asyncio.sleep(every)
            fields: dict[str, str | int] = {}
            if self.watchdog is not None:
                fields["watchdog"] = 1
            if time.monotonic() >= next_status:
                fields["status"] = self.summary()
                next_status = time.monotonic() + STATUS_EVERY
            if fields:
                self.notifier.send(**fields)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.notifier.close()


# --- journald ---------------------------------------------------------------------------------

# sd-daemon(3) priority prefixes, read by journald from a service's stderr (SyslogLevelPrefix=).
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    """`<4>edgeward.health: pool web server ... is now DOWN`: journald keeps the priority and adds
    the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        text = f"{record.name}: {super().format(record)}"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def stderr_is_journal(env: Mapping[str, str] = os.environ) -> bool:
    """Whether stderr is journald's stream ($JOURNAL_STREAM names its device and inode)."""
    stream = env.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return bool(stream) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False
