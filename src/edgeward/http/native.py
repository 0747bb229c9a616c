"""Whether the HTTP layer's hot modules run compiled (mypyc, built by setup.py) or from source.

Imported first by edgeward.http, before any of those modules. The compiled modules are used only
while every source they were compiled from is unchanged (SHA-256s in _compiled.json, written by
the build); otherwise, or with EDGEWARD_PURE_PYTHON=1 in the environment, all of them are imported
from source. All or none: compiled, they call each other's code directly, so a mix would run
stale code. Never compiled itself.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# Keep in step with MODULES in setup.py.
MODULES = ("exchange", "forwarding", "paths", "request", "routes", "timer", "upstream")
MANIFEST = "_compiled.json"

_HERE = Path(__file__).resolve().parent
_NAMES = {f"{__package__}.{m}": m for m in MODULES}


class _FromSource(importlib.abc.MetaPathFinder):
    """Finds the listed modules' .py files, ahead of any compiled module beside them."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        module = _NAMES.get(fullname)
        if module is None:
            return None
        return importlib.util.spec_from_file_location(fullname, _HERE / f"{module}.py")


def _compiled_sources_unchanged() -> bool:
    try:
        recorded = json.loads((_HERE / MANIFEST).read_text())
        return all(recorded.get(m) == hashlib.sha256((_HERE / f"{m}.py").read_bytes()).hexdigest()
                   for m in MODULES)
    except (OSError, ValueError):
        return False  # nothing compiled, or no record of what: the sources


def _select() -> None:
    from_source = os.environ.get("EDGEWARD_PURE_PYTHON") or not _compiled_sources_unchanged()
    if from_source and not any(isinstance(f, _FromSource) for f in sys.meta_path):
        sys.meta_path.insert(0, _FromSource())


def compiled() -> bool:
    """Whether the HTTP layer runs compiled (for `status` and the tests)."""
    module = sys.modules.get(f"{__package__}.exchange")
    return module is not None and not (module.__file__ or "").endswith(".py")


_select()
