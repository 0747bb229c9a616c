"""The contestants: a direct connection and three proxies doing the same work.

Each proxy gets one listener per case in front of the shared upstreams
(iperf3 servers, echo server, the nginx web upstream, the websocket echo
server); `direct` points the client straight at the upstream. The `udp`
listener is TCP and UDP on one port (iperf3's control connection is TCP on the
port its datagrams go to); HAProxy 2.6 does not proxy UDP, so it has no `udp`
listener. The HTTP cases use `http` (plain), `https` (TLS terminated at the
proxy with the run's certificate, plain HTTP to the upstream) and `ws`
(websockets to the echo server). Configs come from bench/configs/*.tmpl.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.certs import ensure_certificate
from bench.procs import Proc, ProcessGroup, tree, wait_port
from bench.templating import CONFIG_DIR, holes, render_file

EDGEWARD_SNI = "bench.example.org"
# Listeners every proxy opens, one per kind of client.
LISTENERS = ("bulk", "rate", "idle", "udp", "http", "https", "ws")
# The fixed response of the nginx web upstream: 99 characters (the config adds
# the newline), 100 bytes on the wire, for every request of the HTTP cases.
HTTP_BODY_LINE = (
    "edgeward bench: the same small body for every request and contestant, from the nginx upstream"
).ljust(99, ".")
HTTP_BODY = (HTTP_BODY_LINE + "\n").encode()
# Proxies that cannot forward UDP: no `udp` listener, absent from the udp case.
NO_UDP = frozenset({"haproxy"})
NGINX_STREAM_MODULES = (
    Path("/usr/lib/nginx/modules/ngx_stream_module.so"),
    Path("/usr/share/nginx/modules/ngx_stream_module.so"),
)


def edgeward_bin() -> Path | None:
    """The edgeward console script of this venv (or on PATH)."""
    import sys

    here = Path(sys.executable).parent / "edgeward"
    if here.exists():
        return here
    found = shutil.which("edgeward")
    return Path(found) if found else None


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else f"exit {out.returncode}"


def nginx_stream_module_line() -> str:
    """`load_module ...;` when nginx builds stream as a dynamic module (Debian)."""
    try:
        built = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10).stderr
    except OSError:
        return ""
    if "--with-stream=dynamic" not in built and "--with-stream " in built + " ":
        return ""
    for path in NGINX_STREAM_MODULES:
        if path.exists():
            return f"load_module {path};"
    raise RuntimeError(
        "nginx has the stream module only as a dynamic module and it is not installed: "
        "apt-get install libnginx-mod-stream"
    )


@dataclass
class Contestant:
    """One way of getting from the client to the upstream."""

    name: str
    # Starts the proxy from its rendered config and waits for its listeners;
    # returns its process (None for direct, which has none).
    launch: Callable[[ProcessGroup, dict[str, int], Path], Proc | None]
    version: Callable[[], str]
    available: Callable[[], str | None] = field(default=lambda: None)  # None = usable
    proc: Proc | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def start(
        self,
        group: ProcessGroup,
        ports: dict[str, int],
        workdir: Path,
        cpus: set[int] | None = None,
    ) -> None:
        self.proc = self.launch(group, ports, workdir)
        self.ports = contestant_ports(self.name, ports)
        if cpus:
            # After start (not in a preexec hook) so forked workers are pinned too.
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, cpus)

    def stop(self, group: ProcessGroup) -> None:
        if self.proc is not None:
            group.stop(self.proc)
            self.proc = None

    def pids(self) -> list[int]:
        """The proxy's processes (master and workers), empty for direct."""
        return tree(self.proc.pid) if self.proc is not None else []

    def port(self, case: str) -> int:
        return self.ports[case]


# Each proxy's config template in bench/configs/.
TEMPLATES = {"haproxy": "haproxy.cfg", "nginx": "nginx.conf", "edgeward": "edgeward.toml"}


def listeners(name: str) -> tuple[str, ...]:
    """The listeners this proxy opens: those whose `{{<listener>_port}}` its template
    has (HAProxy has no UDP one; an edgeward template from before the HTTP edge has
    no HTTP ones, and edgeward then sits out the HTTP cases instead of failing to
    start)."""
    template = TEMPLATES.get(name)
    offered = holes((CONFIG_DIR / f"{template}.tmpl").read_text()) if template else set()
    return tuple(
        case
        for case in LISTENERS
        if f"{case}_port" in offered and not (case == "udp" and name in NO_UDP)
    )


def supports_udp(name: str) -> bool:
    return name not in NO_UDP


def contestant_ports(name: str, all_ports: dict[str, int]) -> dict[str, int]:
    """Which port the client uses per case; direct goes straight to the upstreams."""
    if name == "direct":
        return {
            "bulk": all_ports["iperf"],
            "rate": all_ports["echo"],
            "idle": all_ports["echo"],
            "udp": all_ports["iperf_udp"],
            "http": all_ports["http_upstream"],
            # Without a proxy the upstream nginx terminates TLS itself.
            "https": all_ports["https_upstream"],
            "ws": all_ports["ws_upstream"],
        }
    return {case: all_ports[f"{name}_{case}"] for case in listeners(name)}


def template_values(name: str, all_ports: dict[str, int], workdir: Path) -> dict[str, object]:
    """The holes of bench/configs/<name>'s template. `name` is a proxy or
    "nginx-upstream" (the web upstream of the HTTP cases)."""
    certs = ensure_certificate(workdir)
    values: dict[str, object] = {
        "workdir": workdir,
        "iperf_port": all_ports["iperf"],
        "echo_port": all_ports["echo"],
        "iperf_udp_port": all_ports["iperf_udp"],
        "http_upstream_port": all_ports["http_upstream"],
        "https_upstream_port": all_ports["https_upstream"],
        "ws_upstream_port": all_ports["ws_upstream"],
        "cert_file": certs.cert,
        "key_file": certs.key,
        "cert_key_file": certs.combined,
        "http_body": HTTP_BODY_LINE,
    }
    if name == "nginx-upstream":
        return values
    values.update({f"{case}_port": all_ports[f"{name}_{case}"] for case in listeners(name)})
    if name == "edgeward":
        values["admin_port"] = all_ports["edgeward_admin"]
    if name == "nginx":
        values["nginx_stream_module"] = nginx_stream_module_line()
    return values


def port_names() -> list[str]:
    """Every port a run needs, named for allocate_ports()."""
    names = [
        "iperf",
        "iperf_udp",
        "echo",
        "http_upstream",
        "https_upstream",
        "ws_upstream",
        "edgeward_admin",
    ]
    for proxy in ("haproxy", "nginx", "edgeward"):
        names += [f"{proxy}_{case}" for case in listeners(proxy)]
    return names


def _wait_listeners(proc: Proc, ports: dict[str, int], timeout: float = 15.0) -> None:
    # The udp listener is waited for by its TCP half (bound from the same config).
    for port in ports.values():
        wait_port(port, timeout=timeout, proc=proc)


def _launch_haproxy(group: ProcessGroup, all_ports: dict[str, int], workdir: Path) -> Proc:
    cfg = render_file("haproxy.cfg", template_values("haproxy", all_ports, workdir), workdir)
    # -db: stay in the foreground, no daemon, no master-worker: one process, one PID.
    proc = group.start("haproxy", ["haproxy", "-db", "-f", str(cfg)])
    _wait_listeners(proc, contestant_ports("haproxy", all_ports))
    return proc


def _launch_nginx(group: ProcessGroup, all_ports: dict[str, int], workdir: Path) -> Proc:
    cfg = render_file("nginx.conf", template_values("nginx", all_ports, workdir), workdir)
    # -e: the default error log path (/var/log/nginx) may not be writable.
    proc = group.start("nginx", ["nginx", "-p", str(workdir), "-e", "stderr", "-c", str(cfg)])
    _wait_listeners(proc, contestant_ports("nginx", all_ports))
    return proc


def _launch_edgeward(group: ProcessGroup, all_ports: dict[str, int], workdir: Path) -> Proc:
    cfg = render_file("edgeward.toml", template_values("edgeward", all_ports, workdir), workdir)
    (workdir / "edgeward-state").mkdir(exist_ok=True)
    exe = edgeward_bin()
    assert exe is not None
    proc = group.start("edgeward", [str(exe), "run", str(cfg)])
    _wait_listeners(proc, contestant_ports("edgeward", all_ports), timeout=30.0)
    return proc


def _edgeward_available() -> str | None:
    exe = edgeward_bin()
    if exe is None:
        return "no edgeward executable"
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"edgeward --version failed: {e}"
    if out.returncode != 0:
        return "edgeward --version failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]
    return None


def _which(program: str) -> Callable[[], str | None]:
    return lambda: None if shutil.which(program) else f"{program} not installed"


def all_contestants() -> list[Contestant]:
    return [
        Contestant("direct", lambda g, p, w: None, lambda: "-"),
        Contestant(
            "haproxy",
            _launch_haproxy,
            lambda: _first_line(["haproxy", "-v"]),
            _which("haproxy"),
        ),
        Contestant("nginx", _launch_nginx, lambda: _first_line(["nginx", "-v"]), _which("nginx")),
        Contestant(
            "edgeward",
            _launch_edgeward,
            lambda: _first_line([str(edgeward_bin() or "edgeward"), "--version"]),
            _edgeward_available,
        ),
    ]
