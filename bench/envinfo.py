"""What the numbers were measured on: recorded with every run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
from typing import Any

from bench.contestants import Contestant


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_kb() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def _sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(contestants: list[Contestant]) -> dict[str, Any]:
    try:
        uvloop_version: str | None = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uvloop_version = None
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total_kb": _mem_total_kb(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "uvloop": uvloop_version,
        "iperf3": _version(["iperf3", "--version"]),
        "wrk": _version(["wrk", "-v"]),
        "openssl": _version(["openssl", "version"]),
        "websockets": _dist_version("websockets"),
        "versions": {c.name: c.version() for c in contestants if c.name != "direct"},
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "loadavg_at_start": os.getloadavg(),
        "sysctl": {
            k: _sysctl(k)
            for k in (
                "net.ipv4.tcp_tw_reuse",
                "net.ipv4.ip_local_port_range",
                "net.core.somaxconn",
                "net.ipv4.tcp_congestion_control",
            )
        },
    }
