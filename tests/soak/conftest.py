import os
import sys
from pathlib import Path

# The cases live in tests/reliability (CI runs them small from there); here they run full size.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "reliability"))

# Minutes of load each: only `make soak` (EDGEWARD_SOAK=1) collects them, never `make test`.
if not os.environ.get("EDGEWARD_SOAK"):
    collect_ignore_glob = ["test_*.py"]
