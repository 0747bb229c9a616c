import sys
from pathlib import Path

# tests/support.py is imported as `support` by every test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
