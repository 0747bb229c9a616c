"""Whether the data plane's hot modules run compiled (mypyc, built by setup.py) or from source.

The per-connection path (accept → sniff → route → connect → relay: `NET_MODULES`) is compiled
with mypyc as one group, like the HTTP layer's (edgeward/http/native.py, which decides for
those). Imported by edgeward/__init__.py, so before any of these modules: they span several
packages. They are used compiled only while every source they were compiled from is unchanged
(SHA-256s in `_compiled_net.json`, written by the build); otherwise, or with
EDGEWARD_PURE_PYTHON=1 in the environment, all of them are imported from source. All or none:
compiled, they call each other's code directly, so a mix would run stale code. Never compiled
itself; imports nothing of edgeward.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# Paths under edgeward/, without ".py". Keep in step with NET_MODULES in setup.py.
NET_MODULES = ("admission", "codec/_names", "codec/proxy", "codec/sniff", "codec/tls", "events", "net/flow",
               "net/forward", "net/pipes", "net/poller", "net/refusal", "net/tcp", "routing", "stats", "upstream/pool")
MANIFEST = "_compiled_net.json"

_HERE = Path(__file__).resolve().parent


class _FromSource:
    """Finds one group's modules as .py files, ahead of any compiled module beside them.

    A plain class: sys.meta_path takes any object with `find_spec`, and importlib.abc's
    MetaPathFinder would import importlib.resources (about 1 MB of every process's RSS)."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources  # module name -> its source file

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        source = self.sources.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def _compiled_sources_unchanged(package_dir: Path, modules: Sequence[str], manifest: str) -> bool:
    try:
        recorded = json.loads((package_dir / manifest).read_text())
        return all(recorded.get(m) == hashlib.sha256((package_dir / f"{m}.py").read_bytes()).hexdigest()
                   for m in modules)
    except (OSError, ValueError):
        return False  # nothing compiled, or no record of what: the sources


def choose(package_dir: Path, package: str, modules: Sequence[str], manifest: str) -> None:
    """Run one compiled group (this module's NET_MODULES; edgeward.http's, from http/native.py)
    compiled or, all of it, from source. `modules` are paths under `package_dir` without ".py"
    ("net/tcp"), as the build records them with their SHA-256 in `manifest`."""
    if not os.environ.get("EDGEWARD_PURE_PYTHON") and _compiled_sources_unchanged(package_dir, modules, manifest):
        return
    sources = {f"{package}.{m.replace('/', '.')}": package_dir / f"{m}.py" for m in modules}
    if not any(isinstance(f, _FromSource) and f.sources == sources for f in sys.meta_path):
        sys.meta_path.insert(0, _FromSource(sources))


def compiled() -> bool:
    """Whether the data plane runs compiled (for `status` and the tests). Asks the import system
    where edgeward.net.tcp comes from rather than importing it: this module imports nothing of
    edgeward (the guard, which must not depend on the edge, imports the package's root)."""
    spec = importlib.util.find_spec("edgeward.net.tcp")
    return spec is not None and not (spec.origin or "").endswith(".py")


choose(_HERE, "edgeward", NET_MODULES, MANIFEST)
