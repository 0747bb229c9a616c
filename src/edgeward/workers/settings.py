"""`[edge] workers` as a number."""

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

