"""Values shared by the guard's parts (filters, sources, jails, ban store).

Kept free of I/O so that every part can be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Where filters named without a path are found: fail2ban's own directory, then the filters edgeward
# ships. Here rather than in filter.py so that knowing the path does not load the filter engine.
EDGEWARD_FILTER_DIR = str(Path(__file__).with_name("filters"))
DEFAULT_SEARCH_DIRS: tuple[str, ...] = ("/etc/fail2ban/filter.d", EDGEWARD_FILTER_DIR)


@dataclass(frozen=True, slots=True)
class FailMatch:
    """One failure found in one log entry (or seen by the edge itself)."""

    host: str  # the offending address, normalised (ipaddress-compatible text)
    time: float  # epoch seconds of the entry (from the log's date, else now)
    line: str  # the matched entry (several lines joined by "\n" for maxlines > 1)
    tags: dict[str, str] = field(default_factory=dict)  # <F-...> captures, e.g. {"user": "alice"}
