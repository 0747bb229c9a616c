"""Whether the HTTP layer's hot modules run compiled (mypyc, built by setup.py) or from source.

Imported first by edgeward.http, before any of those modules. The compiled modules are used only
while every source they were compiled from is unchanged (SHA-256s in _compiled.json, written by
the build); otherwise, or with EDGEWARD_PURE_PYTHON=1 in the environment, all of them are imported
from source. All or none: compiled, they call each other's code directly, so a mix would run
stale code. Never compiled itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .._native import choose

# Keep in step with MODULES in setup.py.
MODULES = ("exchange", "forwarding", "outbox", "paths", "request", "routes", "timer", "tls_transport", "upstream")
MANIFEST = "_compiled.json"


def compiled() -> bool:
    """Whether the HTTP layer runs compiled (for `status` and the tests)."""
    module = sys.modules.get("edgeward.http.exchange")
    return module is not None and not (module.__file__ or "").endswith(".py")


# The same choice as the data plane's (edgeward/_native.py), for this group.
choose(Path(__file__).resolve().parent, "edgeward.http", MODULES, MANIFEST)
