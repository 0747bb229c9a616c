"""`[edge] workers = N`: a master keeps the control plane, N worker processes the data plane.

The master (`MasterEdge`, an `Edge` that opens no listener itself) loads and reloads the
config, runs the health checks, the guard and its jails, ACME, the kernel table and the admin
API. It binds every listening address once per worker with SO_REUSEPORT and keeps its copy of
each socket: the kernel spreads new connections (UDP: datagrams, by 4-tuple hash, so a client's
session stays in one worker) over the group, and a worker that dies leaves its socket, and the
connections queued on it, open in the master until its replacement takes them over.

Each worker (`WorkerLink`, started by `edgeward worker`) is an ordinary `Edge` whose listening
sockets come from the master and whose servers' health and bans are the master's: the guard
is the state of record, and the worker holds a mirror `BanSet` its admission reads.

Master and worker talk over one SOCK_SEQPACKET socketpair (message boundaries kept, listening
sockets passed with SCM_RIGHTS): small JSON arrays `[kind, ...]`, sent without waiting. A ban or a
health change reaches every worker in well under a millisecond (`propagation_ms` in each worker's
status: from the master's send to the worker's apply). The config goes in `init` and `reload` as
the master applied it, pickled (`pack_config`): workers never read the file nor validate it.

  master → worker  listeners (+ fds) · init · bans · ban · unban · health · reload · server_drain ·
                   reopen · status · clients · stop
  worker → master  ready · reloaded · status · clients · report (what the jails hear: protocol
                   errors, HTTP 401/403, connections for flood jails; dropped, and counted, when
                   the master does not read) · draining (with its counts: the master starts its
                   successor on the same sockets at once)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import pack_config, unpack_config, worker_count

if TYPE_CHECKING:
    from .channel import Channel
    from .master import MasterEdge
    from .worker import WorkerLink

__all__ = ["Channel", "MasterEdge", "WorkerLink", "pack_config", "unpack_config", "worker_count"]


def __getattr__(name: str) -> object:
    """The master's and the worker's sides, imported when first asked for: a single-process edge
    (workers = 1) reads `worker_count` and never loads them (~0.9 MB of RSS)."""
    if name == "MasterEdge":
        from .master import MasterEdge
        return MasterEdge
    if name == "WorkerLink":
        from .worker import WorkerLink
        return WorkerLink
    if name == "Channel":
        from .channel import Channel
        return Channel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
