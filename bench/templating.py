"""Peer configs live in bench/configs/ as templates with {{name}} holes.

`{{...}}` rather than `$name` or `{name}` because nginx configs are full of
`$variables` and every format here uses braces.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PORT_RANGE = range(20000, 30000)

_HOLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class TemplateError(ValueError):
    pass


def holes(text: str) -> set[str]:
    return set(_HOLE.findall(text))


def render(text: str, values: Mapping[str, object]) -> str:
    """Fill every {{name}}; a missing value is an error, never an empty string."""
    missing = holes(text) - set(values)
    if missing:
        raise TemplateError(f"no value for {', '.join(sorted(missing))}")
    return _HOLE.sub(lambda m: str(values[m.group(1)]), text)


def render_file(name: str, values: Mapping[str, object], out_dir: Path) -> Path:
    """Render bench/configs/<name>.tmpl into out_dir/<name>."""
    text = (CONFIG_DIR / f"{name}.tmpl").read_text()
    out = out_dir / name
    out.write_text(render(text, values))
    return out


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Free for TCP and for UDP: the udp case listens on both with one port number."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def allocate_ports(
    names: Iterable[str], start: int = 21000, candidates: range = PORT_RANGE
) -> dict[str, int]:
    """One free loopback port per name, scanning up from `start` inside the range.

    The scan (not random picks) keeps runs reproducible and easy to spot in `ss`.
    """
    wanted = list(names)
    if len(set(wanted)) != len(wanted):
        raise ValueError("port names must be unique")
    out: dict[str, int] = {}
    ordered = [p for p in candidates if p >= start] + [p for p in candidates if p < start]
    it = iter(ordered)
    for name in wanted:
        for port in it:
            if port_is_free(port):
                out[name] = port
                break
        else:
            raise RuntimeError(f"no free port left in {candidates} for {name}")
    return out
