"""`[edge] workers` as a number, and the config as the master sends it to its workers."""

from __future__ import annotations

import base64
import os
import pickle

from ..config.schema import Config


def pack_config(cfg: Config) -> str:
    """A config the master checked, for a JSON message to its workers: its pickle, in base64.

    A worker unpickles it (frozen dataclasses, config/schema.py): it neither reads the file, which
    may be mid-edit when a worker restarts, nor validates, so it never imports pydantic."""
    return base64.b64encode(pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")


def unpack_config(packed: str) -> Config:
    """`pack_config`'s config again (from the master, over the worker's own control socket)."""
    cfg = pickle.loads(base64.b64decode(packed))  # from our master process
    if not isinstance(cfg, Config):
        raise ValueError(f"the master sent {type(cfg).__name__}, not a config")
    return cfg


def worker_count(cfg: Config) -> int:
    """`[edge] workers` as a number: "auto" is the CPUs this process may run on."""
    n = cfg.edge.workers
    if n == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    return int(n)

