"""The C helpers in bench/tools/, built per run with the system C compiler.

The upstream echo server and the short-connection client cost CPU on the same
small machine as the proxy under test; in C they cost several times less than
in Python. Without a compiler the Python versions (bench/echo.py,
bench/connrate.py) are used and the run's notes say so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent / "tools"
TOOLS = ("tcpecho", "connrate")


def compiler() -> str | None:
    for cc in ("cc", "gcc", "clang"):
        found = shutil.which(cc)
        if found:
            return found
    return None


def build(out_dir: Path) -> tuple[dict[str, Path], str | None]:
    """({tool: executable}, None) or ({}, why not)."""
    cc = compiler()
    if cc is None:
        return {}, "no C compiler: Python echo server and client used"
    out_dir.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    for tool in TOOLS:
        exe = out_dir / tool
        argv = [cc, "-O2", "-Wall", "-o", str(exe), str(TOOLS_DIR / f"{tool}.c")]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return {}, f"{tool}.c did not build ({proc.stderr.strip()[:300]}): Python tools used"
        built[tool] = exe
    return built, None
