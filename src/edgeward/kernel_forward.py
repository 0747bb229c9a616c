"""The kernel fast path: services with `forward = "kernel"` become nftables DNAT rules.

Their packets never enter edgeward: the kernel rewrites the destination to the upstream and
forwards them, so heavy UDP (a TURN relay range, a videobridge's media) costs no Python and no
socket per client. The client's own address reaches the upstream, which must send its replies
back through the edge (a tunnel whose default route is the edge, or policy routing); where it
cannot, `masquerade = true` replaces the client's address by the edge's on the way out.

One table (`[kernel] table`, family inet) holds a `prerouting` nat chain (DNAT) and a
`postrouting` nat chain (masquerade); it is written whole in one `nft -f -` transaction
(create-if-missing, delete, recreate, as guard/nft.py does for the ban table), so a reload
that drops a port drops its rule, and stop removes the table. No other table is touched.
Bans reach these packets through `[guard.nft]` (its prerouting chain at priority -300 drops a
banned source before DNAT at -100): with jails, kernel forwarding requires it.

What the kernel path cannot do (sniff names, send PROXY headers, speak HTTP, pick among several
servers by health) is refused by `problems` at `edgeward check`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .config.loader import Loc, resolve_listen
from .config.schema import Config, KernelSettings, ServiceSettings, nft_table_name
from .config.units import BindSpec, looks_like_address, parse_target
from .guard.nft import NftError, run_nft

log = logging.getLogger("edgeward.kernel")


class KernelForwardError(RuntimeError):
    """`nft` refused the ruleset or could not be run."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One forwarded listen address of a kernel service."""

    service: str
    transport: str  # "tcp" | "udp"
    daddr: str | None  # None = any local address of the family
    first_port: int
    last_port: int
    upstream: str  # an IP address
    upstream_port: int | None  # None = the port the packet came to
    masquerade: bool

    @property
    def family(self) -> str:
        return "ip6" if ":" in self.upstream else "ip"

    def ports(self) -> str:
        return str(self.first_port) if self.first_port == self.last_port else f"{self.first_port}-{self.last_port}"


def kernel_services(cfg: Config) -> list[tuple[str, ServiceSettings]]:
    return [(name, svc) for name, svc in cfg.services.items() if svc.forward == "kernel"]


def _upstream(cfg: Config, svc: ServiceSettings) -> str:
    """The single address a kernel service forwards to (its `to`, or its pool's only server)."""
    pool = cfg.pools.get(svc.to)
    if pool is None:
        return svc.to
    server = pool.servers[0]
    return server if isinstance(server, str) else server.address


def problems(cfg: Config) -> Iterator[tuple[Loc, str, str]]:
    """What the kernel path cannot do, said at `edgeward check` (a loader check)."""
    for name, svc in cfg.services.items():
        if svc.masquerade and svc.forward != "kernel":
            yield (("services", name, "masquerade"), f"service {name!r}: masquerade applies to forward = \"kernel\" only",
                   "remove it, or set forward = \"kernel\"")
    services = kernel_services(cfg)
    if not services:
        return
    for name, svc in services:
        at: Loc = ("services", name)
        for field in ("names", "alpn", "source", "paths"):
            if getattr(svc, field):
                yield ((*at, field), f"service {name!r}: {field} needs the edge to see the traffic, but forward = "
                       "\"kernel\" never does", f"remove {field}, or set forward = \"edge\"")
        if svc.protocol is not None:
            yield ((*at, "protocol"), f"service {name!r}: protocol needs sniffing, which forward = \"kernel\" never does",
                   "remove protocol, or set forward = \"edge\"")
        if svc.to in cfg.handoffs:
            yield ((*at, "to"), f"service {name!r}: forward = \"kernel\" cannot hand a connection to a local server",
                   "forward to an address, or remove forward = \"kernel\"")
            continue
        if svc.transparent:
            yield ((*at, "transparent"), f"service {name!r}: forward = \"kernel\" keeps the client's address by "
                   "itself; transparent is for the edge's own connections", "remove transparent")
        pool = cfg.pools.get(svc.to)
        proxy = svc.proxy_protocol or (pool.proxy_protocol if pool is not None else "off")
        if proxy != "off":
            yield ((*at, "proxy_protocol"), f"service {name!r}: the kernel cannot send a PROXY header; the upstream "
                   "sees the client's own address instead", "remove proxy_protocol here and in the pool")
        if pool is not None and len(pool.servers) != 1:
            yield ((*at, "to"), f"service {name!r}: forward = \"kernel\" sends to one server, pool {svc.to!r} has "
                   f"{len(pool.servers)}", "use a pool of one server or its address, or forward at the edge")
        address = _upstream(cfg, svc)
        if not looks_like_address(address) and pool is None:
            continue  # "no pool named ..." is the loader's own problem
        try:
            target = parse_target(address)
        except ValueError:
            continue  # reported by the loader
        if target.scheme is not None or target.unix_path is not None:
            yield ((*at, "to"), f"service {name!r}: forward = \"kernel\" forwards packets to an IP address, not "
                   f"{address!r}", "write to = \"10.0.0.2\" (same ports) or \"10.0.0.2:PORT\"")
            continue
        try:
            ipaddress.ip_address(target.host or "")
        except ValueError:
            yield ((*at, "to"), f"service {name!r}: nftables forwards to an IP address, not the name {target.host!r}",
                   "write the upstream's IP address")
            continue
        if target.port is not None:
            for item in svc.listen:
                for spec in _specs(cfg, item):
                    if spec.first_port != spec.last_port:
                        yield ((*at, "to"), f"service {name!r}: the range {spec} cannot all go to port {target.port}",
                               "leave the port out of `to` (each port goes to the same port upstream)")
    if cfg.jails and not cfg.guard.nft.enabled:
        yield (("guard", "nft"), "kernel-forwarded services never reach the edge, so their bans must be in nftables",
               "set [guard.nft] enabled = true (its prerouting chain drops banned sources before DNAT)")
    elif cfg.jails and cfg.guard.nft.hook != "prerouting":
        yield (("guard", "nft", "hook"), "[guard.nft] hook = \"input\" does not see forwarded packets",
               "use hook = \"prerouting\" with kernel-forwarded services")


def _specs(cfg: Config, item: str) -> list[BindSpec]:
    try:
        return resolve_listen(cfg, item)
    except ValueError:
        return []


def plan(cfg: Config) -> list[Rule]:
    """The rules of every kernel service (the config has passed `problems`)."""
    rules = []
    for name, svc in kernel_services(cfg):
        target = parse_target(_upstream(cfg, svc))
        assert target.host is not None
        for item in svc.listen:
            for spec in _specs(cfg, item):
                any_host = spec.host in ("::", "0.0.0.0", "")
                rules.append(Rule(name, spec.transport, None if any_host else spec.host, spec.first_port,
                                  spec.last_port, target.host, target.port, svc.masquerade))
    return rules


def render(cfg: Config) -> str:
    """The whole table as an `nft -f` script (an empty table when no service is kernel-forwarded)."""
    t = cfg.kernel.table
    lines = [
        f"# edgeward: services with forward = \"kernel\" ({len(kernel_services(cfg))}); needs net.ipv4.ip_forward=1",
        "# (and net.ipv6.conf.all.forwarding=1 for IPv6 upstreams). Applied whole: a removed port loses its rule.",
        f"add table inet {t}",
        f"delete table inet {t}",
        f"table inet {t} {{",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
    ]
    rules = plan(cfg)
    for r in rules:
        # Only packets of the upstream's family can be rewritten to it (no NAT between families).
        daddr = f" {r.family} daddr {r.daddr}" if r.daddr is not None else ""
        up = f"[{r.upstream}]" if r.family == "ip6" and r.upstream_port is not None else r.upstream
        to = f"{up}:{r.upstream_port}" if r.upstream_port is not None else up
        lines.append(f"    meta nfproto {'ipv6' if r.family == 'ip6' else 'ipv4'}{daddr} {r.transport} dport {r.ports()} "
                     f"dnat {r.family} to {to} comment \"{r.service}\"")
    lines += ["  }", "  chain postrouting {", "    type nat hook postrouting priority srcnat; policy accept;"]
    for r in rules:
        if r.masquerade:
            port = str(r.upstream_port) if r.upstream_port is not None else r.ports()
            lines.append(f"    ct status dnat {r.family} daddr {r.upstream} {r.transport} dport {port} masquerade "
                         f"comment \"{r.service}\"")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def render_removal(settings: KernelSettings) -> str:
    return f"add table inet {settings.table}\ndelete table inet {settings.table}\n"


def forwarding_enabled(families: Sequence[str] = ("ip",)) -> list[str]:
    """The sysctls a kernel path needs that are off here (a warning at start, not a refusal)."""
    off = []
    paths = {"ip": "/proc/sys/net/ipv4/ip_forward", "ip6": "/proc/sys/net/ipv6/conf/all/forwarding"}
    for fam in families:
        try:
            if Path(paths[fam]).read_text().strip() != "1":
                off.append(paths[fam].removeprefix("/proc/sys/").replace("/", "."))
        except OSError:
            pass
    return off


class KernelTable:
    """The running edge's side: apply at start and reload, remove at stop (asyncio, bounded).

    The name of the table in force is kept in STATE_DIR/kernel-table while it exists: an edge
    killed with SIGKILL cannot remove its table, so the next start finds the name there and
    removes or replaces that table (it would otherwise keep forwarding ports the new config
    no longer has)."""

    MARKER = "kernel-table"

    def __init__(self, settings: KernelSettings, state_dir: str | None = None) -> None:
        self.settings = settings
        self.applied = False
        self.rules = 0
        self._lock = asyncio.Lock()  # reloads in quick succession apply in order
        self._marker = Path(state_dir) / self.MARKER if state_dir else None
        left = self._read_marker()
        if left is not None:
            # A table left by an earlier run counts as applied: the first apply replaces it or,
            # when this config forwards nothing in the kernel (or names another table), removes it.
            self.settings = replace(settings, table=left)
            self.applied = True

    def _read_marker(self) -> str | None:
        if self._marker is None:
            return None
        try:
            name = self._marker.read_text().strip()
        except OSError:
            return None
        try:
            return nft_table_name(name)
        except ValueError:  # not written by edgeward: leave whatever it names alone
            return None

    def _write_marker(self) -> None:
        if self._marker is None:
            return
        try:
            if not self.applied:
                self._marker.unlink(missing_ok=True)
            elif self._read_marker() != self.settings.table:
                self._marker.parent.mkdir(parents=True, exist_ok=True)
                self._marker.write_text(self.settings.table + "\n")
        except OSError as e:  # the table itself is in force either way
            log.warning("could not record the kernel table's name in %s: %s", self._marker, e)

    async def _run(self, script: str) -> None:
        try:
            await run_nft(self.settings, script)  # guard/nft.py's runner: bounded by [kernel] timeout
        except NftError as e:
            raise KernelForwardError(f"the kernel-forwarding table: {e}") from None

    async def apply(self, cfg: Config) -> None:
        """Write the table for `cfg` (or remove it when no service is kernel-forwarded any more)."""
        async with self._lock:
            await self._apply(cfg)

    async def _apply(self, cfg: Config) -> None:
        if self.applied and cfg.kernel.table != self.settings.table:
            await self._remove()  # the table was renamed: the old one goes
        self.settings = cfg.kernel
        rules = plan(cfg)
        if not rules:
            await self._remove()
            return
        families = sorted({r.family for r in rules})
        for sysctl in forwarding_enabled(families):
            log.warning("kernel-forwarded services need %s = 1 (sysctl -w %s=1): packets are not forwarded",
                        sysctl, sysctl)
        await self._run(render(cfg))
        self.applied = True
        self.rules = len(rules)
        self._write_marker()
        log.info("kernel forwarding: %d rule(s) in table inet %s", len(rules), cfg.kernel.table)

    async def remove(self) -> None:
        async with self._lock:
            await self._remove()

    async def _remove(self) -> None:
        if not self.applied:
            return
        try:
            await self._run(render_removal(self.settings))
        except KernelForwardError as e:
            log.error("could not remove table inet %s: %s", self.settings.table, e)
            self.applied, self.rules = False, 0
            return  # its name stays recorded: the next start tries again
        self.applied = False
        self.rules = 0
        self._write_marker()
