"""The rendered bench configs are accepted by the real programs' own checkers
(haproxy -c, nginx -t, edgeward check), so a template or schema change that
would only show up in a benchmark run fails here, in CI, in a second."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench.contestants import port_names, template_values
from bench.procs import raise_nofile_limit
from bench.templating import render_file

from support import require


@pytest.fixture
def ports() -> dict[str, int]:
    return {name: 23000 + i for i, name in enumerate(port_names())}


def _check(argv: list[str], cwd: Path) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert out.returncode == 0, f"{argv}:\n{out.stdout}\n{out.stderr}"


def test_haproxy_accepts_its_config(ports: dict[str, int], tmp_path: Path) -> None:
    haproxy = require("haproxy")
    # HAProxy checks that its descriptor needs fit the limit, as the harness run would.
    raise_nofile_limit()
    cfg = render_file("haproxy.cfg", template_values("haproxy", ports, tmp_path), tmp_path)
    _check([haproxy, "-c", "-f", str(cfg)], tmp_path)


def test_nginx_accepts_its_config(ports: dict[str, int], tmp_path: Path) -> None:
    nginx = require("nginx")
    try:
        values = template_values("nginx", ports, tmp_path)
    except RuntimeError as e:  # the stream module is a separate Debian package
        # Under CI a missing peer is a failure (house rule), locally a skip.
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    cfg = render_file("nginx.conf", values, tmp_path)
    _check([nginx, "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(cfg)], tmp_path)


def test_nginx_accepts_the_web_upstream_config(ports: dict[str, int], tmp_path: Path) -> None:
    nginx = require("nginx")
    values = template_values("nginx-upstream", ports, tmp_path)
    cfg = render_file("nginx-upstream.conf", values, tmp_path)
    _check([nginx, "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(cfg)], tmp_path)


def test_edgeward_accepts_its_config(ports: dict[str, int], tmp_path: Path) -> None:
    cfg = render_file("edgeward.toml", template_values("edgeward", ports, tmp_path), tmp_path)
    _check([sys.executable, "-m", "edgeward.cli", "check", str(cfg)], tmp_path)
