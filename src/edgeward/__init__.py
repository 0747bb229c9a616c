"""edgeward: one edge daemon for self-hosters."""

# First: decides whether the data plane's hot modules load compiled or from source (_native.py).
from . import _native  # noqa: F401

__version__ = "0.1.0"
