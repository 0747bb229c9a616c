"""The data plane's compiled modules (mypyc, setup.py's edgeward_net group) and their pure-Python
fallback (edgeward/_native.py): CI runs compiled, the sources still work alone (unit tests of the
codecs and the poller, and real relayed connections), and an edited source is never shadowed by a
module compiled from an older one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgeward
from edgeward import _native

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = Path(edgeward.__file__).resolve().parent
PURE = bool(os.environ.get("EDGEWARD_PURE_PYTHON"))


def _group_library() -> list[Path]:
    return sorted(PACKAGE.parent.glob("edgeward_net__mypyc*.so"))


def test_ci_runs_the_compiled_modules() -> None:
    """`pip install -e .` compiles them on a machine with a C compiler (CI's has one): a module
    that mypyc stops accepting would otherwise fall back to pure Python unnoticed."""
    if os.environ.get("CI") != "true" or PURE:
        pytest.skip("only CI requires the compiled build")
    assert _native.compiled(), "the data plane runs from source: see the warnings of `pip install -v -e .`"


@pytest.mark.skipif(PURE, reason="this is the pure-Python run")
def test_the_sources_pass_the_data_plane_tests_alone() -> None:
    env = {**os.environ, "EDGEWARD_PURE_PYTHON": "1"}
    files = [str(ROOT / "tests/unit/codec"), str(ROOT / "tests/unit/net/test_poller.py"),
             str(ROOT / "tests/integration/test_relay.py"), str(ROOT / "tests/integration/test_sniff_half_closed.py")]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "import edgeward._native as n, edgeward.codec.tls as t; "
                            "print(n.compiled(), t.__file__)"], env=env, capture_output=True, text=True,
                           timeout=60, check=True)
    assert probe.stdout.split()[0] == "False" and probe.stdout.split()[1].endswith("tls.py")


def test_an_edited_source_is_run_not_the_stale_compiled_module(tmp_path: Path) -> None:
    if not _group_library() or not PACKAGE.joinpath(_native.MANIFEST).exists():
        pytest.skip("not compiled in this checkout")
    shutil.copytree(PACKAGE, tmp_path / "edgeward", ignore=shutil.ignore_patterns("__pycache__"))
    for so in PACKAGE.parent.glob("edgeward_*__mypyc*.so"):
        shutil.copy2(so, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "EDGEWARD_PURE_PYTHON"}
    env["PYTHONPATH"] = str(tmp_path)
    probe = [sys.executable, "-c", "import edgeward._native as n, edgeward.net.tcp as t, edgeward.routing as r; "
             "print(n.compiled(), t.__file__, r.__file__, getattr(r, 'EDITED', None))"]

    unchanged = subprocess.run(probe, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    compiled, tcp, routing, _ = unchanged.stdout.split()
    assert compiled == "True" and tcp.endswith(".so") and routing.startswith(str(tmp_path))

    with (tmp_path / "edgeward/routing.py").open("a") as f:
        f.write("\nEDITED = 1\n")
    edited = subprocess.run(probe, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    assert edited.stdout.split() == ["False", str(tmp_path / "edgeward/net/tcp.py"),
                                     str(tmp_path / "edgeward/routing.py"), "1"]
