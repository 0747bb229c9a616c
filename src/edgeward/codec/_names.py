"""Host name normalisation shared by SNI, HTTP Host and XMPP `to`."""

from __future__ import annotations

import re

# Underscore is not RFC 952 but occurs in real names (service records, some intranets);
# routing only compares names, so accepting it costs nothing and avoids refusing clients.
_HOSTNAME = re.compile(
    rb"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
)
MAX_HOSTNAME = 253
# Names already seen, as sent → normalised (None: invalid). Clients ask for the same few names
# again and again; a dict lookup is much cheaper than the lowercasing, the regex and the decode.
# Bounded: emptied when full, so names sent to fill it cost memory only up to CACHE_SIZE.
CACHE_SIZE = 4096
_seen: dict[bytes, str | None] = {}


def normalize_hostname(raw: bytes) -> str | None:
    """Lowercase, drop one trailing dot, validate; None when not a host name."""
    if raw in _seen:
        return _seen[raw]
    name = _normalize(raw)
    if len(_seen) >= CACHE_SIZE:
        _seen.clear()
    _seen[bytes(raw)] = name
    return name


def _normalize(raw: bytes) -> str | None:
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if not name or len(name) > MAX_HOSTNAME or _HOSTNAME.fullmatch(name) is None:
        return None
    return name.decode("ascii")
