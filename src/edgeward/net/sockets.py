"""Every socket the edge makes: listening (TCP, UDP) and upstream (TCP, UDP, Unix).

One place for socket options, so that a new one (IP_TRANSPARENT to connect
upstream from the client's own address, say) is added once and applies to the
data plane and the health checks alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import socket
import ssl
from _socket import socket as RawSocket
from collections.abc import Callable
from typing import TypeVar

from ..config.units import Target

IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python 3.11 does not export it


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def bind_failure(transport: str, host: str, port: int, listener: str, e: OSError) -> str:
    """What to tell the user when a listening socket cannot be made: which address, why, and what
    usually fixes it (as HAProxy names the address in its "cannot bind socket")."""
    where = f"{'udp/' if transport == 'udp' else ''}{f'[{host}]' if ':' in host else host}:{port}"
    msg = f"cannot bind {where}" + (f" (listener {listener})" if listener != where else "") + f": {e.strerror or e}"
    hint = {
        errno.EADDRINUSE: f"another program (or another edgeward) has the port: `ss -lntup 'sport = :{port}'` "
                          "shows which",
        errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE (contrib/systemd/edgeward.service "
                      "grants it)",
        errno.EADDRNOTAVAIL: "no interface of this machine has that address (`ip addr` lists them)",
    }.get(e.errno or 0)
    return f"{msg}; {hint}" if hint else msg


def listen_tcp(host: str, port: int, backlog: int, reuseport: bool) -> socket.socket:
    """A bound, listening, non-blocking TCP socket."""
    s = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def bind_udp(host: str, port: int, reuseport: bool) -> socket.socket:
    """A bound non-blocking UDP socket. No SO_REUSEADDR: for UDP it would let a second socket
    (another process, a stale edge) silently share the port and steal datagrams. On a wildcard
    address it reports each datagram's destination (pktinfo), so replies can leave from it."""
    family = family_of(host)
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if is_wildcard(host):
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.bind((host, port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


# Linux values; Python 3.11 exports IP_TRANSPARENT only, and not everywhere.
IP_TRANSPARENT: int = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
IP_BIND_ADDRESS_NO_PORT = 24


class TransparentFamilyError(OSError):
    """A transparent upstream socket cannot take the client's address: the families differ."""


def _bind_transparent(s: RawSocket, source: str) -> None:
    """Bind `s` to `source` (the client's IP, not an address of this host) with IP_TRANSPARENT, so
    the upstream sees the client itself. The port is left to connect() (IP_BIND_ADDRESS_NO_PORT):
    binding picks no port, so many clients behind one address still get distinct 4-tuples."""
    if (":" in source) != (s.family == socket.AF_INET6):
        raise TransparentFamilyError(errno.EAFNOSUPPORT, f"client {source} and upstream are of different families")
    if s.family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
    if s.type == socket.SOCK_STREAM:
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((source, 0))


def check_transparent() -> None:
    """Raise PermissionError unless this process may make transparent sockets (CAP_NET_ADMIN,
    or CAP_NET_RAW): checked once at start, not discovered per connection."""
    for family, level, opt in ((socket.AF_INET, socket.IPPROTO_IP, IP_TRANSPARENT),
                               (socket.AF_INET6, socket.IPPROTO_IPV6, IPV6_TRANSPARENT)):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host: nothing to check for it
        with s:
            s.setsockopt(level, opt, 1)


_S = TypeVar("_S", bound=RawSocket)


def upstream_tcp(target: Target, default_port: int, source: str | None = None) -> tuple[socket.socket, object]:
    """A non-blocking stream socket for `target` and the address to connect it to (no port in the
    target: `default_port`, the port the client came to). With `source` (transparent mode), the
    socket is bound to that address, the client's. Raises OSError."""
    return _upstream_tcp(socket.socket, target, default_port, source)


def upstream_tcp_raw(target: Target, default_port: int, source: str | None = None) -> tuple[RawSocket, object]:
    """upstream_tcp as the C-level `_socket.socket`, for the data plane's relays: they use the
    socket's descriptor and a few calls, none of what the Python wrapper adds (and costs)."""
    return _upstream_tcp(RawSocket, target, default_port, source)


def _upstream_tcp(make: Callable[[int, int], _S], target: Target, default_port: int,
                  source: str | None) -> tuple[_S, object]:
    if target.unix_path is not None:
        return make(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK), target.unix_path
    host = target.host
    assert host is not None
    s = make(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            _bind_transparent(s, source)
    except BaseException:
        s.close()
        raise
    return s, (host, target.port or default_port)


def handoff_control() -> socket.socket:
    """A non-blocking Unix stream socket to connect to a handoff endpoint (net/handoff.py). Not
    inherited by child processes: it will carry a client's socket."""
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


def unix_address(path: str) -> str:
    """A Unix socket path as the socket calls take it ("@name": Linux abstract namespace)."""
    return "\0" + path[1:] if path.startswith("@") else path


def upstream_udp(target: Target, default_port: int, source: str | None = None) -> socket.socket:
    """A non-blocking UDP socket connected to `target` (no port: `default_port`); with `source`
    (transparent mode), bound to that address, the client's."""
    if target.host is None:  # unix: targets are refused for UDP by the config check
        raise OSError(errno.EAFNOSUPPORT, "UDP cannot go to a unix socket")
    host = target.host
    up = socket.socket(family_of(host), socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        if source is not None:
            _bind_transparent(up, source)
        up.connect((host, target.port or default_port))
    except BaseException:
        up.close()
        raise
    return up


async def open_stream(target: Target, port: int | None, tls: ssl.SSLContext | None = None,
                      server_name: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An asyncio stream to `target` (at `port` if given), for control-plane clients (health checks);
    TLS with `tls`, asking for and checking `server_name`."""
    t = target if port is None or target.unix_path is not None else dataclasses.replace(target, port=port)
    sock, addr = upstream_tcp(t, port or 0)
    try:
        await asyncio.get_running_loop().sock_connect(sock, addr)  # type: ignore[arg-type]
    except BaseException:
        sock.close()
        raise
    if target.unix_path is not None:
        return await asyncio.open_unix_connection(sock=sock, ssl=tls, server_hostname=server_name if tls else None)
    return await asyncio.open_connection(sock=sock, ssl=tls, server_hostname=server_name if tls else None)
