"""Mirror the ban set into an nftables table, so the kernel drops banned sources.

The table holds two sets (IPv4 and IPv6, with per-element timeouts for timed
bans) and one chain that drops packets from their members. `render_table`
gives the whole table (applied atomically: create-if-missing, delete,
recreate, in one ``nft -f -`` transaction); `NftSync` then keeps it in step
with incremental element commands, batched into one ``nft`` run per burst.

Only bans that protect every listener are mirrored: the kernel rule drops all
of the source's traffic, which is right for "banned everywhere" and wrong for
a ban limited to some listeners (those stay enforced at admit only).

The settings (table, hook, priority, how nft is run) are `NftSettings` of the
config schema: ``[guard.nft]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

from edgeward.config.schema import NftSettings
from edgeward.guard.banset import normalize_addr

log = logging.getLogger(__name__)


class NftError(RuntimeError):
    """``nft`` refused a ruleset or could not be run."""


SET4 = "banned4"
SET6 = "banned6"


def _element(addr: str, timeout: float | None) -> tuple[str, str] | None:
    """(set name, element text) for an address, None if not an address."""
    key = normalize_addr(addr)
    if key is None:
        return None
    set_name = SET4 if isinstance(ipaddress.ip_address(key), ipaddress.IPv4Address) else SET6
    if timeout is None:
        return set_name, key
    return set_name, f"{key} timeout {max(1, math.ceil(timeout))}s"


def _group(elements: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {SET4: [], SET6: []}
    for set_name, text in elements:
        out[set_name].append(text)
    return out


def render_table(cfg: NftSettings, bans: Iterable[tuple[str, float | None]] = ()) -> str:
    """The whole table as an ``nft -f`` script; `bans` are (address, seconds left or None)."""
    groups = _group(e for a, t in bans if (e := _element(a, t)) is not None)
    t = cfg.table
    lines = [
        # "add" is a no-op when the table exists, so the delete cannot fail.
        f"add table inet {t}",
        f"delete table inet {t}",
        f"table inet {t} {{",
    ]
    for set_name, kind in ((SET4, "ipv4_addr"), (SET6, "ipv6_addr")):
        lines.append(f"  set {set_name} {{")
        lines.append(f"    type {kind}")
        lines.append("    flags timeout")
        if groups[set_name]:
            lines.append("    elements = { " + ", ".join(groups[set_name]) + " }")
        lines.append("  }")
    lines += [
        "  chain filter {",
        f"    type filter hook {cfg.hook} priority {cfg.priority}; policy accept;",
        f"    ip saddr @{SET4} drop",
        f"    ip6 saddr @{SET6} drop",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_delete_table(cfg: NftSettings) -> str:
    return f"add table inet {cfg.table}\ndelete table inet {cfg.table}\n"


def render_changes(
    cfg: NftSettings, adds: Sequence[tuple[str, float | None]], deletes: Sequence[str]
) -> str:
    """Element commands for one batch.

    ``delete element`` fails on a missing element and would abort the whole
    transaction, so every delete is preceded by an ``add`` of the same
    element (a no-op if present). Adds are done the same way, because an
    ``add`` of an existing element keeps its old timeout.
    """
    out: list[str] = []
    t = cfg.table
    for addr in [*deletes, *(a for a, _ in adds)]:
        e = _element(addr, None)
        if e is not None:
            out.append(f"add element inet {t} {e[0]} {{ {e[1]} }}")
            out.append(f"delete element inet {t} {e[0]} {{ {e[1]} }}")
    for addr, timeout in adds:
        e = _element(addr, timeout)
        if e is not None:
            out.append(f"add element inet {t} {e[0]} {{ {e[1]} }}")
    return "\n".join(out) + ("\n" if out else "")


class NftCommand(Protocol):
    """How to run nft: `[guard.nft]`'s settings, or `[kernel]`'s (kernel_forward.py)."""

    @property
    def command(self) -> list[str]: ...

    @property
    def timeout(self) -> float: ...


async def run_nft(cfg: NftCommand, script: str) -> str:
    """Run ``nft -f -`` with `script`; returns stdout, raises NftError on failure."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *cfg.command,
            "-f",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise NftError(f"cannot run {cfg.command[0]}: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(script.encode()), cfg.timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise NftError("nft timed out") from None
    if proc.returncode != 0:
        raise NftError(f"nft failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


class NftSync:
    """Keeps the kernel's set in step with the ban set; changes are batched.

    `add`/`delete` are synchronous and cheap (they queue); one background task
    flushes the queue with one ``nft`` run, so a burst of bans costs one
    process. Failures are logged and counted, never raised into the caller:
    the ban set at admit stays the authority.
    """

    def __init__(self, cfg: NftSettings) -> None:
        self.cfg = cfg
        self._adds: dict[str, float | None] = {}  # address -> absolute end (epoch) or None
        self._deletes: set[str] = set()
        self._flushing: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.errors = 0
        self.runs = 0

    async def apply_full(
        self, bans: Iterable[tuple[str, float | None]], now: float | None = None
    ) -> None:
        """Replace the table; `bans` are (address, absolute end or None). Raises NftError."""
        now = time.time() if now is None else now
        script = render_table(
            self.cfg,
            (
                (a, None if end is None else end - now)
                for a, end in bans
                if end is None or end > now
            ),
        )
        await run_nft(self.cfg, script)
        self.runs += 1

    async def remove_table(self) -> None:
        await run_nft(self.cfg, render_delete_table(self.cfg))

    def add(self, addr: str, end: float | None) -> None:
        self._deletes.discard(addr)
        self._adds[addr] = end
        self._kick()

    def delete(self, addr: str) -> None:
        self._adds.pop(addr, None)
        self._deletes.add(addr)
        self._kick()

    async def flushed(self) -> None:
        """Wait until every queued change reached nft (or failed)."""
        while self._adds or self._deletes or not self._idle.is_set():
            await self._idle.wait()
            if self._adds or self._deletes:
                self._kick()
                await asyncio.sleep(0)

    def _kick(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._idle.clear()
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # gather the rest of a burst
            while self._adds or self._deletes:
                now = time.time()
                adds = [
                    (a, None if e is None else e - now)
                    for a, e in self._adds.items()
                    if e is None or e > now
                ]
                deletes = sorted(self._deletes)
                self._adds.clear()
                self._deletes.clear()
                script = render_changes(self.cfg, adds, deletes)
                if not script:
                    continue
                try:
                    await run_nft(self.cfg, script)
                    self.runs += 1
                except NftError as exc:
                    self.errors += 1
                    log.warning("nft sync failed: %s", exc)
        finally:
            self._idle.set()

    async def close(self) -> None:
        if self._flushing is not None:
            self._flushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flushing
