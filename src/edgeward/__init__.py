"""edgeward: one edge daemon for self-hosters."""

__version__ = "0.1.0"
