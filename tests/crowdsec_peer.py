"""Debian's crowdsec as a test peer: only its Local API (`crowdsec -no-cs`), on a loopback high
port, with its own config.yaml, profiles, data directory and SQLite database under the test's
tmp directory (nothing of /etc/crowdsec is read); `cscli -c` that config adds bouncers,
machines and decisions. Stopped (and restarted on the same port and data) by PID.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from support import free_port, require, wait_port

PROFILES = """\
name: default_ip_remediation
filters:
 - Alert.Remediation == true && Alert.GetScope() == "Ip"
decisions:
 - type: ban
   duration: 4h
on_success: break
"""


class Lapi:
    """`tls`: (certificate, key, CA) PEM paths: the LAPI serves HTTPS with that certificate and
    accepts bouncers' client certificates signed by the CA with OU "bouncer-ou"."""

    def __init__(self, tmp: Path, port: int | None = None, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.exe = require("crowdsec")
        self.cscli_exe = require("cscli")
        self.dir = tmp
        self.port = port or free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/"
        d = tmp
        for sub in ("data", "hub", "notifications"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "profiles.yaml").write_text(PROFILES)
        (d / "simulation.yaml").write_text("simulation: false\n")
        (d / "local_api_credentials.yaml").write_text("")
        self.config = d / "config.yaml"
        tls_server = "" if tls is None else f"""
    tls:
      cert_file: {tls[0]}
      key_file: {tls[1]}
      ca_cert_path: {tls[2]}
      client_verification: VerifyClientCertIfGiven
      bouncers_allowed_ou: [bouncer-ou]
      agents_allowed_ou: [agent-ou]"""
        self.config.write_text(f"""\
common:
  daemonize: false
  log_media: stdout
  log_level: info
config_paths:
  config_dir: {d}/
  data_dir: {d}/data/
  simulation_path: {d}/simulation.yaml
  hub_dir: {d}/hub/
  index_path: {d}/hub/.index.json
  notification_dir: {d}/notifications/
  plugin_dir: /usr/lib/crowdsec/plugins/
db_config:
  type: sqlite
  db_path: {d}/data/crowdsec.db
  use_wal: true
api:
  client:
    credentials_path: {d}/local_api_credentials.yaml
    insecure_skip_verify: {"true" if tls else "false"}
  server:
    listen_uri: 127.0.0.1:{self.port}
    profiles_path: {d}/profiles.yaml
    trusted_ips: [127.0.0.1]{tls_server}
prometheus:
  enabled: false
""")
        self.log_path = d / "lapi.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # cscli talks to the LAPI as a machine (decisions add/delete, alerts list).
        self.cscli("machines", "add", "tester", "--auto", "-f", str(d / "local_api_credentials.yaml"),
                   "--url", self.url)

    def cscli(self, *args: str) -> str:
        r = subprocess.run([self.cscli_exe, "-c", str(self.config), *args], capture_output=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"cscli {' '.join(args)} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
        return r.stdout.decode()

    def add_bouncer(self, name: str) -> str:
        return self.cscli("bouncers", "add", name, "-o", "raw").strip()

    def add_machine(self, name: str, password: str) -> None:
        self.cscli("machines", "add", name, "--password", password, "-f", "/dev/null")

    def alerts(self) -> list[dict[str, object]]:
        out = self.cscli("alerts", "list", "-o", "json")
        data = json.loads(out or "[]")
        return data if isinstance(data, list) else []

    def start(self) -> None:
        assert self.proc is None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.config), "-no-cs"], stdout=log,
                                         stderr=subprocess.STDOUT)
        try:
            wait_port("127.0.0.1", self.port, 20)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def kill(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def lapi(tmp: Path) -> Iterator[Lapi]:
    server = Lapi(tmp)
    server.start()
    try:
        yield server
    finally:
        server.stop()
