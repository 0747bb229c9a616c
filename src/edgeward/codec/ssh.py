"""SSH identification string (RFC 4253 4.2): `SSH-protoversion-softwareversion [comments]`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgeward.codec.errors import NEED_MORE, NeedMore, SSHError

MAX_BANNER = 255  # RFC 4253 4.2, CR LF included
PREFIX = b"SSH-"

# RFC 4253 forbids '-' in softwareversion, but deployed peers send it ("Cisco-1.25",
# "libssh-0.6.0"), so only protoversion excludes it. A bare LF end is accepted as
# RFC 4253 asks of servers for old clients.
_BANNER = re.compile(rb"SSH-([\x21-\x2c\x2e-\x7e]+)-([\x21-\x7e]+)(?: [\x20-\x7e]*)?\r?\n")
_PARTIAL = re.compile(rb"SSH-[\x21-\x7e]*(?: [\x20-\x7e]*)?\r?")


@dataclass(frozen=True, slots=True)
class SSHBanner:
    version: str  # protoversion: "2.0", or "1.99" for a v1-compatible v2 peer
    software: str  # softwareversion, comments excluded
    length: int  # bytes of the line, line end included


def parse_ssh_banner(data: bytes) -> SSHBanner | NeedMore:
    """Parse the identification line a client sends first."""
    n = min(len(data), len(PREFIX))
    if data[:n] != PREFIX[:n]:
        raise SSHError("not an SSH identification string")
    eol = data.find(b"\n", 0, MAX_BANNER)
    if eol < 0:
        if len(data) >= MAX_BANNER or (n == len(PREFIX) and not _PARTIAL.fullmatch(data)):
            raise SSHError("bad or overlong SSH identification string")
        return NEED_MORE
    m = _BANNER.fullmatch(data, 0, eol + 1)
    if m is None:
        raise SSHError(f"bad SSH identification string {data[: eol + 1]!r}")
    return SSHBanner(m.group(1).decode("ascii"), m.group(2).decode("ascii"), eol + 1)
