"""`[edge] workers` as a number, and what `check` refuses with workers."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..config.schema import Config

TextLoader = Callable[[str, str], Config]  # (config text, file name) → Config: how a worker reads the master's


def worker_count(cfg: Config) -> int:
    """`[edge] workers` as a number: "auto" is the CPUs this process may run on."""
    n = cfg.edge.workers
    if n == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    return int(n)


def problems(cfg: Config) -> list[tuple[tuple[str | int, ...], str, str]]:
    """What `workers > 1` cannot do yet: ACME. Certificates are ordered and renewed by one
    process, and each worker terminates TLS with its own store; without a store shared through
    the master, N workers would each order every certificate. File certificates work."""
    if worker_count(cfg) <= 1 or not cfg.acme.enabled:
        return []
    from ..config.loader import service_scheme
    https = [n for n, svc in cfg.services.items() if service_scheme(cfg, svc) is not None]
    if not https:
        return []
    return [(("edge", "workers"), f"workers = {cfg.edge.workers} with HTTP services ({', '.join(sorted(https))}) "
             "needs [acme] enabled = false: ACME runs in one process only",
             "give the HTTP services [tls] certificate files and set [acme] enabled = false, or keep workers = 1")]
