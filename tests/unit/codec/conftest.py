import sys
from pathlib import Path

# The codec tests share codec_samples.py; importlib import mode puts no test folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
