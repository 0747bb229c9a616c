"""The HTTP cases' rig works end to end with the real peers: the run's certificate,
the nginx web upstream, the websocket echo server, HAProxy and nginx proxying
plain HTTP, TLS and websockets, the probe, the idle holder and wrk (tiny bounded
runs; nothing here asserts a speed)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.cases import REPO_DIR, ProbeError, bench_env, probe_http
from bench.certs import NAME, ensure_certificate, make_certificate
from bench.contestants import Contestant, all_contestants, port_names, template_values
from bench.procs import ProcessGroup, raise_nofile_limit, wait_port
from bench.templating import allocate_ports, render_file
from bench.wrk import parse_wrk, wrk_argv
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from support import ThreadServer, require


def test_certificate_is_ecdsa_p256_for_bench_test(tmp_path: Path) -> None:
    cert_pem, key_pem = make_certificate()
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NAME]
    assert b"PRIVATE KEY" in key_pem


def test_ensure_certificate_is_idempotent_and_private(tmp_path: Path) -> None:
    first = ensure_certificate(tmp_path)
    der = first.der()
    again = ensure_certificate(tmp_path)
    assert again.der() == der  # one key per run, whoever renders first
    for path in (first.key, first.combined):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    combined = first.combined.read_bytes()
    assert combined.startswith(first.cert.read_bytes()) and combined.endswith(
        first.key.read_bytes()
    )


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, int], Path, dict[str, Contestant]]]:
    """nginx upstream + websocket echo server + HAProxy + nginx + edgeward, on free
    loopback ports."""
    require("nginx")
    require("haproxy")
    raise_nofile_limit()
    workdir = tmp_path_factory.mktemp("rig")
    ports = allocate_ports(port_names(), start=27000)
    try:
        contestants = {c.name: c for c in all_contestants()}
        with ProcessGroup(workdir) as group:
            cfg = render_file(
                "nginx-upstream.conf", template_values("nginx-upstream", ports, workdir), workdir
            )
            up = group.start(
                "nginx-upstream", ["nginx", "-p", str(workdir), "-e", "stderr", "-c", str(cfg)]
            )
            ws = group.start(
                "wsecho",
                [sys.executable, "-m", "bench.wsecho", "--port", str(ports["ws_upstream"])],
                env=bench_env(),
            )
            for name, proc in (("http_upstream", up), ("https_upstream", up), ("ws_upstream", ws)):
                wait_port(ports[name], proc=proc)
            for c in contestants.values():
                c.start(group, ports, workdir)
            yield ports, workdir, contestants
    except RuntimeError as e:  # nginx without its stream module (a separate Debian package)
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


CONTESTANTS = ["direct", "haproxy", "nginx", "edgeward"]


@pytest.mark.parametrize("name", CONTESTANTS)
@pytest.mark.parametrize("tls", [False, True])
def test_probe_through_each_contestant(
    rig: tuple[dict[str, int], Path, dict[str, Contestant]], name: str, tls: bool
) -> None:
    _, workdir, contestants = rig
    c = contestants[name]
    der = ensure_certificate(workdir).der()
    info = probe_http(c.port("https" if tls else "http"), tls, der)
    assert info["status"] == 200
    if tls:
        assert info["tls_version"] == "TLSv1.3"
        # Another certificate is not the run's: the probe refuses it.
        other = x509.load_pem_x509_certificate(make_certificate()[0])
        with pytest.raises(ProbeError, match="not the run's certificate"):
            probe_http(c.port("https"), True, other.public_bytes(Encoding.DER))


def test_probe_refuses_a_wrong_answer(
    rig: tuple[dict[str, int], Path, dict[str, Contestant]],
) -> None:
    ports, _, _ = rig
    # The websocket server answers a plain GET with 426, not the upstream's body.
    with pytest.raises(ProbeError, match="status 426"):
        probe_http(ports["ws_upstream"], False)
    with pytest.raises(ProbeError):
        probe_http(ports["http_upstream"], True)  # TLS to a plain-HTTP port


def _hold_and_release(
    port: int, mode: str, count: int
) -> tuple[dict[str, object], dict[str, object]]:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.httphold",
            "--port",
            str(port),
            "--count",
            str(count),
            "--mode",
            mode,
            "--timeout",
            "10",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=bench_env(),
        cwd=REPO_DIR,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        ready = holder.stdout.readline()
        assert ready.startswith("READY "), ready
        holder.stdin.write("\n")
        holder.stdin.flush()
        done = holder.stdout.readline()
        assert done.startswith("DONE "), done
        assert holder.wait(timeout=30) == 0
        return json.loads(ready[6:]), json.loads(done[5:])
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdin.close()  # type: ignore[union-attr]
        holder.stdout.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("name", CONTESTANTS)
@pytest.mark.parametrize("mode", ["http", "ws"])
def test_idle_holder_through_each_contestant(
    rig: tuple[dict[str, int], Path, dict[str, Contestant]], name: str, mode: str
) -> None:
    _, _, contestants = rig
    ready, done = _hold_and_release(contestants[name].port(mode), mode, 20)
    assert ready["open"] == 20 and ready["failed"] == 0, ready
    assert done == {"still_open": 20}


def test_idle_holder_counts_failures(tmp_path: Path) -> None:
    port = allocate_ports(["nothing"], start=28500)["nothing"]
    ready, done = _hold_and_release(port, "http", 5)  # nothing listens there
    assert ready["open"] == 0 and ready["failed"] == 5
    assert done == {"still_open": 0}


@pytest.mark.parametrize("name", ["haproxy", "edgeward"])
@pytest.mark.parametrize("close", [False, True])
def test_wrk_through_a_proxy_is_parsed(
    rig: tuple[dict[str, int], Path, dict[str, Contestant]], name: str, close: bool
) -> None:
    require("wrk")
    _, _, contestants = rig
    url = f"https://127.0.0.1:{contestants[name].port('https')}/"
    argv = wrk_argv(url, 1, connections=4, close=close)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    result = parse_wrk(out.stdout)
    assert result.requests > 0
    assert result.errors == {}, out.stdout
    assert result.bytes_read > 100 * result.requests  # the body and its headers
    assert {"p50", "p99"} <= set(result.latency_ms)


def test_every_proxy_sends_the_same_forwarded_headers(tmp_path: Path) -> None:
    """The peers' configs do the work edgeward does: the upstream gets X-Forwarded-For,
    -Proto, -Host, X-Real-IP and Forwarded from each proxy, over HTTP and HTTPS, and a
    copy the client sent is replaced."""
    require("nginx")
    require("haproxy")
    raise_nofile_limit()
    ports = allocate_ports(port_names(), start=26000)
    heads: list[bytes] = []
    body = b"ok"

    def upstream(conn: socket.socket) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            heads.append(head)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body)

    server = ThreadServer(upstream, port=ports["http_upstream"])
    wanted = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"}
    try:
        with ProcessGroup(tmp_path) as group:
            for c in all_contestants():
                if c.name == "direct":
                    continue
                c.start(group, ports, tmp_path)
                for listener in ("http", "https"):
                    ctx = ssl.create_default_context()
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                    conn: http.client.HTTPConnection = (
                        http.client.HTTPSConnection(
                            "127.0.0.1", c.port(listener), timeout=10, context=ctx
                        )
                        if listener == "https"
                        else http.client.HTTPConnection("127.0.0.1", c.port(listener), timeout=10)
                    )
                    heads.clear()
                    conn.request(
                        "GET", "/", headers={"Host": "bench.test", "X-Forwarded-For": "6.6.6.6"}
                    )
                    assert conn.getresponse().read() == body
                    conn.close()
                    assert len(heads) == 1, (c.name, listener)
                    fields = {}
                    for line in heads[0].split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        fields.setdefault(name.strip().lower(), []).append(value.strip())
                    assert wanted <= set(fields), (c.name, listener, fields)
                    assert fields[b"x-forwarded-for"] == [b"127.0.0.1"], (c.name, fields)
                    assert fields[b"x-forwarded-proto"] == [listener.encode()], c.name
                    assert fields[b"x-forwarded-host"] == [b"bench.test"], c.name
                    forwarded = b",".join(fields[b"forwarded"])
                    assert (
                        b"for=127.0.0.1" in forwarded and b"proto=" + listener.encode() in forwarded
                    )
                c.stop(group)
    finally:
        server.close()
