"""Bad-input classes: scripts of hostile clients, shared by the CPU-budget test and the storm soak.

Each maker returns one client's script (harness.Script) for a listener that routes
a.example.org by SNI and trusts PROXY headers from TRUSTED only.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from harness import Script

from edgeward.codec.testing import build_client_hello

SNIFF_TIMEOUT = 2.0
HELLO = build_client_hello("a.example.org", ["h2"])
UNTRUSTED, TRUSTED = "127.0.0.1", "127.0.0.2"


def _random_bytes(rng: random.Random) -> Script:
    return Script([(0.0, rng.randbytes(rng.randint(1, 3000)))])


def _truncated_silence(rng: random.Random) -> Script:
    return Script([(0.0, HELLO[: rng.randint(6, len(HELLO) - 1)])])


def _truncated_fin(rng: random.Random) -> Script:
    return Script([(0.0, HELLO[: rng.randint(6, len(HELLO) - 1)])], fin_at=0.02)


def _oversized(rng: random.Random) -> Script:
    return Script([(0.0, b"\x16\x03\x01\xff\xff\x01\xff\xff\xfb" + rng.randbytes(20000))])


_BAD_PROXY = [
    b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 443\r\n",
    b"PROXY " + b"9" * 200 + b"\r\n",
    # v2 announcing 65535 bytes of addresses and sending 30: the edge waits for the rest
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff" + bytes(30),
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4),  # shorter than an IPv4 address block
    # v2 announcing an IPv6 block (36 bytes) and sending 20: the edge waits for the rest
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24" + bytes(20),
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1000",  # no CRLF yet: the edge waits for it
]


def _bad_proxy(rng: random.Random) -> Script:
    return Script([(0.0, rng.choice(_BAD_PROXY))], src=TRUSTED)


def _untrusted_proxy(rng: random.Random) -> Script:
    hdr = b"PROXY TCP4 203.0.113.9 192.0.2.2 5000 443\r\n"
    return Script([(0.0, hdr + HELLO)], src=UNTRUSTED)


def _endless_head(rng: random.Random) -> Script:
    return Script([(0.0, b"GET / HTTP/1.1\r\nHost: a.example.org\r\nX: " + b"x" * 70000)])


def silent(rng: random.Random) -> Script:
    return Script([])


def classes(sniff_timeout: float) -> dict[str, tuple[Callable[[random.Random], Script], bool]]:
    """name → (script maker, whether the edge must wait for the client: a busy-loop risk)."""
    def trickle(rng: random.Random) -> Script:
        # One byte a second until the sniff timeout cuts the client off.
        return Script([(float(i), HELLO[i : i + 1]) for i in range(int(sniff_timeout) + 2)])

    return {
        "random bytes": (_random_bytes, False),
        "truncated hello, then silence": (_truncated_silence, True),
        "truncated hello, then FIN": (_truncated_fin, True),
        "trickle, 1 byte/s": (trickle, True),
        "oversized hello (20 KB record)": (_oversized, False),
        "bad PROXY lengths (trusted)": (_bad_proxy, True),
        "PROXY from an untrusted source": (_untrusted_proxy, False),
        "endless HTTP head (70 KB)": (_endless_head, False),
        "connects that send nothing": (silent, True),
    }
