import sys
from pathlib import Path

# harness.py and the case modules beside this file are imported by name, here and from tests/soak.
sys.path.insert(0, str(Path(__file__).resolve().parent))
