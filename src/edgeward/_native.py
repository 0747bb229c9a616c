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
import importlib.abc
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
               "net/forward", "net/pipes", "net/poller", "net/refusal", "net/tcp", "routing", "upstream/pool")
MANIFEST = "_compiled_net.json"

_HERE = Path(__file__).resolve().parent
_NAMES = {"edgeward." + m.replace("/", "."): m for m in NET_MODULES}


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
                   for m in NET_MODULES)
    except (OSError, ValueError):
        return False  # nothing compiled, or no record of what: the sources


def _select() -> None:
    from_source = os.environ.get("EDGEWARD_PURE_PYTHON") or not _compiled_sources_unchanged()
    if from_source and not any(isinstance(f, _FromSource) for f in sys.meta_path):
        sys.meta_path.insert(0, _FromSource())


def compiled() -> bool:
    """Whether the data plane runs compiled (for `status` and the tests). Asks the import system
    where edgeward.net.tcp comes from rather than importing it: this module imports nothing of
    edgeward (the guard, which must not depend on the edge, imports the package's root)."""
    spec = importlib.util.find_spec("edgeward.net.tcp")
    return spec is not None and not (spec.origin or "").endswith(".py")


_select()
