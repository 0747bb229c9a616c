"""Build script: the metadata is in pyproject.toml; this adds hot modules compiled with mypyc when it
can, in two groups: the HTTP layer's (about 30% less CPU per proxied request, see
docs/architecture.md) and the data plane's per-connection path (accept, sniff, route, connect,
relay: net/, the TLS ClientHello codec, routing, pool picking).

- EDGEWARD_PURE_PYTHON=1 at build time skips compiling.
- Any failure (mypyc refuses a module, no C compiler or Python headers) leaves that group pure
  Python, with a warning: the compiled modules are an optimisation, never a requirement.
- Beside them goes a record of the SHA-256 of each source they were compiled from
  (src/edgeward/http/_compiled.json, src/edgeward/_compiled_net.json): edgeward.http (native.py)
  and edgeward (_native.py) use them only while every source is unchanged, so an edited checkout
  runs what it says until `pip install -e .` compiles it again.
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


class Group:
    """Modules compiled together (they call each other natively: all of them or none), under
    `base` (a package directory), with the record of their sources' digests at `manifest`."""

    def __init__(self, name: str, what: str, base: str, modules: tuple[str, ...], manifest: str) -> None:
        self.name = name
        self.what = what
        self.base = base
        self.modules = modules
        self.manifest = manifest
        self.extensions: list[Extension] = []

    def sources(self) -> list[str]:
        return [f"{self.base}/{m}.py" for m in self.modules]

    def digests(self) -> dict[str, str]:
        return {m: hashlib.sha256((ROOT / self.base / f"{m}.py").read_bytes()).hexdigest() for m in self.modules}


GROUPS = (
    # Keep in step with MODULES in src/edgeward/http/native.py.
    Group("edgeward_http", "the HTTP layer", "src/edgeward/http",
          ("exchange", "forwarding", "outbox", "paths", "request", "routes", "timer", "tls_transport", "upstream"), "http/_compiled.json"),
    # Keep in step with NET_MODULES in src/edgeward/_native.py.
    Group("edgeward_net", "the data plane", "src/edgeward",
          ("admission", "codec/_names", "codec/proxy", "codec/sniff", "codec/tls", "events", "net/flow",
           "net/forward", "net/pipes", "net/poller", "net/refusal", "net/tcp", "routing", "stats", "upstream/pool"),
          "_compiled_net.json"),
)


def _warn(group: Group, what: str, error: BaseException | None = None) -> None:
    detail = f": {type(error).__name__}: {error}" if error is not None else ""
    print(f"edgeward setup: {what}{detail}; {group.what} runs as pure Python", file=sys.stderr)


def _extensions() -> list[Extension]:
    if os.environ.get("EDGEWARD_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as e:
        for g in GROUPS:
            _warn(g, "mypyc is not available", e)
        return []
    exts: list[Extension] = []
    for g in GROUPS:
        try:
            # The build environment has none of edgeward's dependencies installed: their types are
            # Any here, and only the compiled modules' own errors count (the rest is checked by
            # `make lint` with everything installed).
            g.extensions = mypycify(
                ["--config-file=", "--ignore-missing-imports", "--follow-imports=silent", *g.sources()],
                group_name=g.name, opt_level="3")
        except BaseException as e:  # mypy reports errors by exiting
            _warn(g, "mypyc could not compile the modules", e)
            g.extensions = []
        exts += g.extensions
    return exts


class OptionalBuildExt(build_ext):  # type: ignore[misc]
    """build_ext that leaves a group pure Python on any failure, and records what it compiled."""

    def run(self) -> None:
        super().run()
        # After run(): setuptools builds with inplace off, then copies into the source tree.
        for g in GROUPS:
            if g.extensions:
                self._write_manifest(g)

    def build_extensions(self) -> None:
        self.check_extensions_list(self.extensions)
        for g in GROUPS:
            if not g.extensions:
                continue
            try:
                for ext in g.extensions:
                    self.build_extension(ext)
            except Exception as e:
                self._remove_outputs(g)
                _warn(g, "compiling the modules failed", e)
                # Nothing of it to copy into the source tree either.
                self.extensions = [x for x in self.extensions if x not in g.extensions]
                g.extensions = []

    def _outputs(self, g: Group) -> list[Path]:
        """Where each extension goes, in the build tree and in the source tree (in place)."""
        paths = []
        for ext in g.extensions:
            relative = self.get_ext_filename(self.get_ext_fullname(ext.name))
            paths += [Path(self.build_lib) / relative, ROOT / "src" / relative]
        return paths

    def _remove_outputs(self, g: Group) -> None:
        """Never a half-compiled group: its modules call each other natively, all or none."""
        for path in self._outputs(g):
            path.unlink(missing_ok=True)

    def _manifest(self, g: Group) -> Path:
        return ROOT / "src/edgeward" / g.manifest if self.inplace else Path(self.build_lib) / "edgeward" / g.manifest

    def _write_manifest(self, g: Group) -> None:
        target = self._manifest(g)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(g.digests(), indent=1, sort_keys=True) + "\n")

    def get_outputs(self) -> list[str]:
        outputs: list[str] = super().get_outputs()
        if not self.inplace:
            outputs += [str(self._manifest(g)) for g in GROUPS if g.extensions and self._manifest(g).exists()]
        return outputs


kwargs: dict[str, Any] = {"ext_modules": _extensions(), "cmdclass": {"build_ext": OptionalBuildExt}}
setup(**kwargs)
