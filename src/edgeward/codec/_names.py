"""Host name normalisation shared by SNI, HTTP Host and XMPP `to`."""

from __future__ import annotations

import re

# Underscore is not RFC 952 but occurs in real names (service records, some intranets);
# routing only compares names, so accepting it costs nothing and avoids refusing clients.
_HOSTNAME = re.compile(
    rb"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
)
MAX_HOSTNAME = 253


def normalize_hostname(raw: bytes) -> str | None:
    """Lowercase, drop one trailing dot, validate; None when not a host name."""
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if not name or len(name) > MAX_HOSTNAME or _HOSTNAME.fullmatch(name) is None:
        return None
    return name.decode("ascii")
