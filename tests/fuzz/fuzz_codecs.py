"""Fuzz the sans-I/O codecs: only CodecError may escape, and every parser stays bounded.

    python tests/fuzz/fuzz_codecs.py --target tls|proxy|http|xmpp|ssh|handoff|sniff --iterations N

(tests/fuzz/fuzzer.py is the full driver: coverage-guided, every codec and the guard's
parsers, kept corpus; this file defines the codec targets and the built-in mutator.)

Uses atheris (coverage-guided) when it is importable, else a built-in mutation
fuzzer seeded with valid messages: bit flips, byte sets, truncation, insertion,
deletion, duplication, length-field tweaks and splicing of two seeds. Inputs
that produce a new outcome are kept as further seeds.
"""

from __future__ import annotations

import argparse
import importlib
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeward.codec import (
    NEED_MORE,
    CodecError,
    build_proxy_v1,
    build_proxy_v2,
    build_proxy_v2_local,
    http,
    parse_client_hello,
    parse_http_head,
    parse_proxy,
    parse_ssh_banner,
    parse_xmpp_header,
    proxy,
    sniff,
    ssh,
    tls,
    xmpp,
)
from edgeward.codec import handoff as handoff_codec
from edgeward.codec.testing import build_client_hello

NS = "http://etherx.jabber.org/streams"
DATA = Path(__file__).resolve().parent.parent / "unit" / "codec" / "data"


def _captured(prefix: str) -> list[bytes]:
    return [bytes.fromhex(p.read_text()) for p in sorted(DATA.glob(f"{prefix}*.hex"))]


def _tls_seeds() -> list[bytes]:
    return [
        build_client_hello("example.org", ["h2", "http/1.1"]),
        build_client_hello(None),
        build_client_hello("a.b.example", ["xmpp-client"], record_split=40),
        build_client_hello("x.example", [], record_split=1)[:600],
        *_captured("openssl_"),
    ]


def _proxy_seeds() -> list[bytes]:
    return [
        build_proxy_v1(("192.0.2.1", 1234), ("198.51.100.2", 443)),
        build_proxy_v1(("2001:db8::1", 1), ("2001:db8::2", 2)),
        b"PROXY UNKNOWN\r\n",
        build_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2), alpn="h2", authority="a.example"),
        build_proxy_v2(("2001:db8::1", 1), ("::1", 2), transport="UDP"),
        build_proxy_v2_local(),
        *_captured("haproxy_"),
    ]


_HTTP_SEEDS = [
    b"GET /index.html HTTP/1.1\r\nHost: www.example.org\r\nAccept: */*\r\n\r\n",
    b"POST http://a.example:8080/x HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
]
_XMPP_SEEDS = [
    f"<?xml version='1.0'?><stream:stream to='example.org' xmlns='jabber:client' "
    f"xmlns:stream='{NS}' version='1.0'>".encode(),
    f'<s:stream xmlns:s="{NS}" xmlns="jabber:server" to="b&#xfc;cher.example">'.encode(),
]
_SSH_SEEDS = [b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", b"SSH-1.99-Cisco-1.25\n"]


def _handoff_seeds() -> list[bytes]:
    rec = handoff_codec.HandoffRecord
    return [
        handoff_codec.build_record(rec("web", ("192.0.2.7", 51234), ("198.51.100.1", 443), "tls", "a.example.org",
                                       ("h2", "http/1.1"))),
        handoff_codec.build_record(rec("chat", ("2001:db8::5", 1), ("::1", 5223), "xmpp", "example.org",
                                       listener_name="tls", via_proxy=True, handoff_id=7)),
        handoff_codec.build_record(rec("s", ("10.0.0.1", 0))),
        b"\x00", b"\x01", b"\x04",  # acknowledgements: a record starts with "E", so these fuzz parse_ack
    ]


def _handoff(data: bytes) -> object:
    # One target for both messages the protocol has: a record (starts with "E"), else an ack.
    if data[:1] == b"E":
        return handoff_codec.parse_record(data)
    return handoff_codec.parse_ack(data)


def _sniff(data: bytes) -> object:
    # The last byte picks `final` so both modes are explored from one input.
    return sniff(data[:-1], final=bool(data[-1] & 1)) if data else sniff(data)


@dataclass(frozen=True, slots=True)
class Target:
    parse: Callable[[bytes], object]
    seeds: Callable[[], list[bytes]]
    bound: int  # NEED_MORE is only allowed for shorter inputs


TARGETS: dict[str, Target] = {
    "tls": Target(parse_client_hello, _tls_seeds, tls.MAX_STREAM + 5),
    "proxy": Target(parse_proxy, _proxy_seeds, proxy.V2_MAX),
    "http": Target(parse_http_head, lambda: list(_HTTP_SEEDS), http.MAX_HEAD),
    "xmpp": Target(parse_xmpp_header, lambda: list(_XMPP_SEEDS), xmpp.MAX_HEADER + 1),
    "ssh": Target(parse_ssh_banner, lambda: list(_SSH_SEEDS), ssh.MAX_BANNER),
    "handoff": Target(_handoff, _handoff_seeds, handoff_codec.MAX_RECORD),
    "sniff": Target(
        _sniff,
        lambda: [s + b"\x00" for s in _tls_seeds() + _HTTP_SEEDS + _XMPP_SEEDS + _SSH_SEEDS],
        tls.MAX_STREAM + 6,
    ),
}


_VARYING = re.compile(r"[0-9]+|<[^>]*>|b?'.*|b?\".*")


class Escaped(AssertionError):
    """Something other than a value, NEED_MORE or CodecError came out of a parser."""


def check(target: Target, data: bytes) -> str:
    """Run one input; return an outcome label, raise Escaped on a broken invariant."""
    try:
        result = target.parse(data)
    except CodecError as exc:
        # Digits and quoted input vary per input; dropping them keeps outcomes few and meaningful.
        return f"{type(exc).__name__}:{_VARYING.sub('', str(exc))[:40]}"
    except Exception as exc:
        raise Escaped(f"{type(exc).__name__}: {exc} on input {data.hex()}") from exc
    if result is NEED_MORE:
        if len(data) >= target.bound:
            raise Escaped(f"NEED_MORE for {len(data)} bytes (bound {target.bound}): {data.hex()}")
        return "NEED_MORE"
    length = getattr(result, "length", None)
    detail = getattr(result, "detail", None)
    length = getattr(detail, "length", length)
    if length is not None and not 0 < length <= len(data):
        raise Escaped(f"length {length} outside input of {len(data)}: {data.hex()}")
    return type(result).__name__


_INTERESTING = [0x00, 0x01, 0x03, 0x0A, 0x0D, 0x16, 0x20, 0x3A, 0x3C, 0x3E, 0x7F, 0x80, 0xFF]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 6))):
        op = rng.randrange(9)
        n = len(buf)
        if op == 0 and n:  # flip a bit
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # set a byte to an interesting or random value
            buf[rng.randrange(n)] = rng.choice([*_INTERESTING, rng.randrange(256)])
        elif op == 2:  # truncate
            del buf[rng.randrange(n + 1) :]
        elif op == 3:  # insert random bytes
            pos = rng.randrange(n + 1)
            buf[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, 16, 200)))
        elif op == 4 and n:  # delete a range
            pos = rng.randrange(n)
            del buf[pos : pos + rng.randrange(1, 32)]
        elif op == 5 and n:  # duplicate a chunk
            pos = rng.randrange(n)
            chunk = buf[pos : pos + rng.randrange(1, 64)]
            at = rng.randrange(n + 1)
            buf[at:at] = chunk * rng.choice((1, 2, 50))
        elif op == 6 and n >= 2:  # tweak what may be a length field
            pos = rng.randrange(n - 1)
            value = rng.choice((0, 1, 0xFF, 0x100, 0x3FFF, 0x4000, 0xFFFF, rng.randrange(65536)))
            buf[pos : pos + 2] = value.to_bytes(2, "big")
        elif op == 7:  # splice with another corpus entry
            other = rng.choice(corpus)
            cut = rng.randrange(n + 1)
            buf = buf[:cut] + other[rng.randrange(len(other) + 1) :]
        elif op == 8 and n:  # replace a chunk with a printable run
            pos = rng.randrange(n)
            buf[pos : pos + 4] = rng.choice((b" ", b"\r\n", b"'", b'"', b"&amp;", b":", b"-", b"."))
    return bytes(buf[: 2 * 16384 + 64])


@dataclass(slots=True)
class Stats:
    iterations: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    corpus: int = 0


def run(name: str, iterations: int, seed: int = 0) -> Stats:
    """Built-in mutation fuzzing of one target; raises Escaped on the first failure."""
    return run_target(TARGETS[name], iterations, seed)


def run_target(target: Target, iterations: int, seed: int = 0) -> Stats:
    """Built-in mutation fuzzing from `target.seeds()`; raises Escaped on the first failure."""
    rng = random.Random(seed)
    corpus = target.seeds()
    stats = Stats()
    for data in corpus:  # the seeds themselves must parse
        outcome = check(target, data)
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
    for _ in range(iterations):
        data = mutate(rng, rng.choice(corpus), corpus)
        outcome = check(target, data)
        if outcome not in stats.outcomes and len(corpus) < 500:
            corpus.append(data)  # a new outcome is a cheap stand-in for new coverage
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        stats.iterations += 1
    stats.corpus = len(corpus)
    return stats


def _load_atheris() -> Any:
    try:
        return importlib.import_module("atheris")
    except ImportError:
        return None


def _run_atheris(atheris: Any, name: str, iterations: int) -> None:
    target = TARGETS[name]
    atheris.instrument_all()  # the codecs are already imported; instrument them in place

    def one_input(data: bytes) -> None:
        check(target, data)

    seeds_dir = Path(tempfile.mkdtemp(prefix=f"edgeward-fuzz-{name}-"))
    for i, s in enumerate(target.seeds()):
        (seeds_dir / f"seed{i}").write_bytes(s)
    atheris.Setup([sys.argv[0], f"-runs={iterations}", str(seeds_dir)], one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), required=True)
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--builtin", action="store_true", help="ignore atheris if installed")
    args = parser.parse_args(argv)
    atheris = None if args.builtin else _load_atheris()
    if atheris is not None:
        _run_atheris(atheris, args.target, args.iterations)
        return 0
    started = time.monotonic()
    try:
        stats = run(args.target, args.iterations, args.seed)
    except Escaped as exc:
        print(f"FAIL {args.target}: {exc}", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    print(
        f"{args.target}: {stats.iterations} inputs in {took:.1f}s, corpus {stats.corpus}, "
        f"{len(stats.outcomes)} distinct outcomes"
    )
    for outcome, count in sorted(stats.outcomes.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {count:8d}  {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
