"""The path a request is routed by, and segment-aware prefix matching.

A request is routed by its path as an upstream will understand it, while the target itself is
forwarded untouched. Otherwise "/http-bind/../admin" would match the "/http-bind" route and reach
/admin on that route's upstream, which the config never exposed. So for routing only, the path is
percent-decoded (also %2F and %5C, which some servers decode into separators), backslashes count as
slashes, repeated slashes are merged and dot segments removed (RFC 3986 5.2.4); nginx picks its
location from the same kind of normalized path.

Sans-I/O: bytes in, bytes out.
"""

from __future__ import annotations

import re

_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_SLASHES = re.compile(rb"/{2,}")


def _unquote(m: re.Match[bytes]) -> bytes:
    return bytes((int(m.group(1), 16),))


def routing_path(path: bytes) -> bytes:
    """The normalized form of a request path (the target before '?') used to pick a route."""
    # (find, not `in`: bytes.__contains__ first tries its argument as an integer, and the
    # TypeError it formats and drops costs more than the search.)
    if path.find(b"%") >= 0:
        path = _PCT.sub(_unquote, path)
    if path.find(b"\\") >= 0:
        path = path.replace(b"\\", b"/")
    if path.find(b"//") >= 0:
        path = _SLASHES.sub(b"/", path)
    if path.find(b".") < 0:
        return path if path.startswith(b"/") else b"/" + path
    out: list[bytes] = []
    segments = path.split(b"/")
    for seg in segments[1:] if segments[0] == b"" else segments:
        if seg == b"..":
            if out:
                out.pop()
        elif seg != b".":
            out.append(seg)
    # A path ending in a dot segment names a directory: "/a/b/.." is "/a/".
    trailing = segments[-1] in (b".", b"..")
    result = b"/" + b"/".join(out)
    if trailing and not result.endswith(b"/"):
        result += b"/"
    return result


def prefix_matches(prefix: bytes, path: bytes) -> bool:
    """Segment-aware: "/http-bind" matches "/http-bind" and "/http-bind/x", not "/http-binder"."""
    if prefix == b"/":
        return True
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == 0x2F)
