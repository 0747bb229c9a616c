"""`python -m edgeward` is the `edgeward` command."""

from .entry import main

main()
