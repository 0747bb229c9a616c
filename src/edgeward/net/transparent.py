"""Transparent mode: which services connect upstream from the client's own address, and the return
path they need (`edgeward nft`).

With IP_TRANSPARENT (net/sockets.py) the edge's upstream socket is bound to the client's address,
so the upstream's `getpeername()`/`recvfrom()` and its logs see the client with no header. Its
replies are addressed to the client, though: they must come back through the edge (the upstream's
route to client addresses goes via the edge), and the edge's kernel must deliver them to its own
sockets instead of forwarding them. The standard recipe (the kernel's tproxy documentation, HAProxy's
`usesrc clientip`): nftables marks packets that belong to a transparent socket (`socket transparent
1`), and a policy route sends marked packets to a table where every address is local.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from ..config.schema import Config, ServiceSettings
from ..config.units import parse_target

if TYPE_CHECKING:
    from ..upstream.pool import Pool, Server

DEFAULT_MARK = 0x7E  # "~": any fwmark bit pattern the host does not already use
DEFAULT_TABLE = 126
NFT_TABLE = "edgeward_transparent"


def pick_same_family(pool: Pool, client_ip: str, exclude: tuple[Server, ...],
                     now: float) -> tuple[Server | None, bool]:
    """A server of `pool` the client's address can be the source of (an IPv4 client cannot connect
    to an IPv6 server as itself, nor the reverse), skipping the others; and whether any was skipped
    (when no server is left, the refusal is then `transparent_family`)."""
    v6 = ":" in client_ip
    skipped: tuple[Server, ...] = ()
    while True:
        server = pool.pick(client_ip.encode(), exclude + skipped, now)
        host = server.target.host if server is not None else None
        if server is None or host is None or (":" in host) == v6:
            return server, bool(skipped)
        skipped += (server,)


def transparent_of(cfg: Config, svc: ServiceSettings) -> bool:
    """Whether `svc` connects upstream from the client's address: its own setting, else its pool's."""
    if svc.transparent is not None:
        return svc.transparent
    target = svc.fallback if svc.to in cfg.handoffs else svc.to
    pool = cfg.pools.get(target or "")
    return pool is not None and pool.transparent


def transparent_upstreams(cfg: Config) -> dict[str, list[str]]:
    """{service: the server addresses it connects to transparently} (hosts as written)."""
    out: dict[str, list[str]] = {}
    for name, svc in cfg.services.items():
        if not transparent_of(cfg, svc):
            continue
        target = svc.fallback if svc.to in cfg.handoffs else svc.to
        if target is None:
            continue
        pool = cfg.pools.get(target)
        addresses = [s if isinstance(s, str) else s.address for s in pool.servers] if pool is not None else [target]
        hosts = []
        for a in addresses:
            t = parse_target(a)
            if t.host is not None:
                hosts.append(t.host)
        out[name] = hosts
    return out


def return_path_script(cfg: Config, mark: int = DEFAULT_MARK, table: int = DEFAULT_TABLE) -> str:
    """A shell script (run as root; idempotent) that sets up the return path of `cfg`'s transparent
    services: policy routing for marked packets and the nftables table that marks them."""
    users = transparent_upstreams(cfg)
    v4: set[str] = set()
    v6: set[str] = set()
    named = False  # a server given by name: its address is unknown here, so no source filter
    for hosts in users.values():
        for h in hosts:
            try:
                ip = ipaddress.ip_address(h)
            except ValueError:
                named = True
                continue
            (v6 if ip.version == 6 else v4).add(str(ip))
    families = [f for f, used in (("4", v4 or named), ("6", v6 or named)) if used]
    lines = [
        "#!/bin/sh",
        "# The return path of edgeward's transparent mode (`edgeward nft`): "
        + (", ".join(f"services.{n}" for n in users) or "no service asks for it in this config") + ".",
        "# The edge connects to these upstreams from client addresses. Their replies (addressed to clients) must",
        "# reach this host (the upstreams route client addresses via it), where nftables marks packets that belong",
        f"# to a transparent socket and the mark routes them to table {table}, in which every address is local.",
        "# Run as root; running it again replaces what it made.",
        "set -e",
    ]
    if not users:
        return "\n".join(lines) + "\n"
    for f in families:
        anywhere = "0.0.0.0/0" if f == "4" else "::/0"
        lines += [
            f"while ip -{f} rule del fwmark {mark:#x} lookup {table} 2>/dev/null; do :; done",
            f"ip -{f} rule add fwmark {mark:#x} lookup {table}",
            f"ip -{f} route replace local {anywhere} dev lo table {table}",
        ]
    rules = []
    for key, addrs in (("ip", v4), ("ip6", v6)):
        if addrs:
            rules.append(f"        {key} saddr {{ {', '.join(sorted(addrs))} }} socket transparent 1 "
                         f"meta mark set {mark:#x}")
    if named:
        rules = [f"        socket transparent 1 meta mark set {mark:#x}"]
    lines += [
        "nft -f - <<'EOF'",
        f"table inet {NFT_TABLE}",
        f"delete table inet {NFT_TABLE}",
        f"table inet {NFT_TABLE} {{",
        "    chain prerouting {",
        "        type filter hook prerouting priority mangle; policy accept;",
        *rules,
        "    }",
        "}",
        "EOF",
    ]
    return "\n".join(lines) + "\n"
