"""bench/ lives at the repository root, outside src/: make it importable however
pytest is started."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
