"""The HTTP layer's compiled modules (mypyc, setup.py) and their pure-Python fallback
(edgeward/http/native.py): CI runs compiled, the sources still work alone, and an edited source is
never shadowed by a module compiled from an older one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgeward
from edgeward.http import native

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = Path(edgeward.__file__).resolve().parent
PURE = bool(os.environ.get("EDGEWARD_PURE_PYTHON"))


def _compiled_files() -> list[Path]:
    return sorted(p for p in (*PACKAGE.joinpath("http").glob("*.so"), *PACKAGE.parent.glob("edgeward_http__mypyc*.so")))


def test_ci_runs_the_compiled_modules() -> None:
    """`pip install -e .` compiles them on a machine with a C compiler (CI's has one): a module
    that mypyc stops accepting would otherwise fall back to pure Python unnoticed."""
    import edgeward.http.exchange  # noqa: F401 - what compiled() looks at

    if os.environ.get("CI") != "true" or PURE:
        pytest.skip("only CI requires the compiled build")
    assert native.compiled(), "the HTTP modules run from source: see the warnings of `pip install -v -e .`"


@pytest.mark.skipif(PURE, reason="this is the pure-Python run")
def test_the_sources_pass_the_http_unit_tests_alone() -> None:
    env = {**os.environ, "EDGEWARD_PURE_PYTHON": "1"}
    here = Path(__file__).resolve().parent
    files = [str(p) for p in sorted(here.glob("test_*.py")) if p.name != Path(__file__).name]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "import edgeward.http.exchange as e, edgeward.http as h; "
                            "print(h.native.compiled(), e.__file__)"], env=env, capture_output=True, text=True,
                           timeout=60, check=True)
    assert probe.stdout.split()[0] == "False" and probe.stdout.split()[1].endswith("exchange.py")


def test_an_edited_source_is_run_not_the_stale_compiled_module(tmp_path: Path) -> None:
    if not _compiled_files() or not PACKAGE.joinpath("http", native.MANIFEST).exists():
        pytest.skip("not compiled in this checkout")
    shutil.copytree(PACKAGE, tmp_path / "edgeward", ignore=shutil.ignore_patterns("__pycache__"))
    for so in PACKAGE.parent.glob("edgeward_http__mypyc*.so"):
        shutil.copy2(so, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "EDGEWARD_PURE_PYTHON"}
    env["PYTHONPATH"] = str(tmp_path)
    probe = [sys.executable, "-c", "import edgeward.http as h, edgeward.http.exchange as e, edgeward.http.timer as t; "
             "print(h.native.compiled(), e.__file__, t.__file__, getattr(t, 'EDITED', None))"]

    unchanged = subprocess.run(probe, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    compiled, exchange, timer, _ = unchanged.stdout.split()
    assert compiled == "True" and exchange.endswith(".so") and timer.startswith(str(tmp_path))

    with (tmp_path / "edgeward/http/timer.py").open("a") as f:
        f.write("\nEDITED = 1\n")
    edited = subprocess.run(probe, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    assert edited.stdout.split() == ["False", str(tmp_path / "edgeward/http/exchange.py"),
                                     str(tmp_path / "edgeward/http/timer.py"), "1"]
