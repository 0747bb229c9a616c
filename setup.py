"""Build script: the metadata is in pyproject.toml; this adds the HTTP layer's hot modules compiled
with mypyc (about 30% less CPU per proxied request, see docs/architecture.md) when it can.

- EDGEWARD_PURE_PYTHON=1 at build time skips compiling.
- Any failure (mypyc refuses a module, no C compiler or Python headers) leaves a pure-Python
  install, with a warning: the compiled modules are an optimisation, never a requirement.
- Beside them goes src/edgeward/http/_compiled.json, the SHA-256 of each source they were compiled
  from: edgeward.http (native.py) uses them only while every source is unchanged, so an edited
  checkout runs what it says until `pip install -e .` compiles it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = "src/edgeward/http"
# Keep in step with MODULES in src/edgeward/http/native.py.
MODULES = ("exchange", "forwarding", "paths", "request", "routes", "timer", "upstream")
MANIFEST = "_compiled.json"


def _warn(what: str, error: BaseException | None = None) -> None:
    detail = f": {type(error).__name__}: {error}" if error is not None else ""
    print(f"edgeward setup: {what}{detail}; the HTTP layer runs as pure Python", file=sys.stderr)


def _sources() -> list[str]:
    return [f"{PACKAGE}/{m}.py" for m in MODULES]


def _digests() -> dict[str, str]:
    return {m: hashlib.sha256((ROOT / PACKAGE / f"{m}.py").read_bytes()).hexdigest() for m in MODULES}


def _extensions() -> list[Extension]:
    if os.environ.get("EDGEWARD_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as e:
        _warn("mypyc is not available", e)
        return []
    try:
        # The build environment has none of edgeward's dependencies installed: their types are
        # Any here, and only the compiled modules' own errors count (the rest is checked by
        # `make lint` with everything installed).
        exts: list[Extension] = mypycify(
            ["--config-file=", "--ignore-missing-imports", "--follow-imports=silent", *_sources()],
            group_name="edgeward_http", opt_level="3")
        return exts
    except BaseException as e:  # mypy reports errors by exiting
        _warn("mypyc could not compile the HTTP modules", e)
        return []


class OptionalBuildExt(build_ext):  # type: ignore[misc]
    """build_ext that falls back to pure Python on any failure, and records what it compiled."""

    def run(self) -> None:
        if not self.extensions:
            super().run()
            return
        try:
            super().run()
        except Exception as e:
            self._remove_outputs()
            _warn("compiling the HTTP modules failed", e)
            return
        self._write_manifest()

    def _outputs(self) -> list[Path]:
        """Where each extension goes, in the build tree and in the source tree (in place)."""
        paths = []
        for ext in self.extensions:
            relative = self.get_ext_filename(self.get_ext_fullname(ext.name))
            paths += [Path(self.build_lib) / relative, ROOT / "src" / relative]
        return paths

    def _remove_outputs(self) -> None:
        """Never a half-compiled package: the modules call each other natively, all or none."""
        for path in self._outputs():
            path.unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        text = json.dumps(_digests(), indent=1, sort_keys=True) + "\n"
        targets = [ROOT / PACKAGE / MANIFEST] if self.inplace else [Path(self.build_lib) / "edgeward/http" / MANIFEST]
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)

    def get_outputs(self) -> list[str]:
        outputs: list[str] = super().get_outputs()
        if self.extensions and not self.inplace:
            manifest = Path(self.build_lib) / "edgeward/http" / MANIFEST
            if manifest.exists():
                outputs.append(str(manifest))
        return outputs


kwargs: dict[str, Any] = {"ext_modules": _extensions(), "cmdclass": {"build_ext": OptionalBuildExt}}
setup(**kwargs)
