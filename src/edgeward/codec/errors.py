"""Errors and the "need more bytes" sentinel shared by every codec."""

from __future__ import annotations

import enum
from typing import Final, Literal, TypeAlias


class CodecError(ValueError):
    """Input that can never become a valid message, whatever bytes follow."""


class TLSError(CodecError):
    """Malformed or oversized TLS ClientHello."""


class ProxyError(CodecError):
    """Malformed PROXY protocol header (v1 or v2), or bad builder input."""


class HTTPError(CodecError):
    """Malformed, oversized or non-HTTP/1.x request head."""


class XMPPError(CodecError):
    """Malformed or oversized XMPP stream header."""


class SSHError(CodecError):
    """Malformed or oversized SSH identification string."""


class Incomplete(enum.Enum):
    """Not enough bytes yet to decide; call again with more data."""

    NEED_MORE = "NEED_MORE"

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = Incomplete.NEED_MORE
# A one-member Literal lets mypy narrow `result is NEED_MORE` to the value type.
NeedMore: TypeAlias = Literal[Incomplete.NEED_MORE]
