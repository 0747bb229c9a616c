"""Other ways to pre-screen log lines, kept only to measure the default against.

edgeward's filter drops most lines before any regex runs: a line must hold
every required word of some failregex, tested with plain ``in``
(``Filter.set_prefilter("literal")``, the default).  The screens here look for
the first word of each clause with one engine call per line instead, then
check the rest of the clause with ``in``:

* ``re``: one alternation of Python's ``re``;
* ``re2``: the same alternation on google-re2 (linear time, but each call
  crosses into C++);
* ``hyperscan``: Intel Hyperscan's multi-literal scanner.

bench/jail_lines.py times them all against "literal" and "none"; "literal"
won (docs/design-notes.md), so these live in bench/ and not in the edge.
google-re2 and hyperscan come with the ``bench`` extra.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from edgeward.guard.filter import Filter

KINDS = ("literal", "re", "re2", "hyperscan", "none")
# the Python packages the screens need, for a clear "not installed"
MODULES = {"re2": "re2", "hyperscan": "hyperscan"}


def install(flt: Filter, kind: str) -> None:
    """Pre-screen `flt`'s lines with `kind` (one of KINDS). Raises ImportError when
    its engine is not installed, ValueError for an unknown kind."""
    if kind in ("literal", "none"):
        flt.set_prefilter(kind)
        return
    if kind not in KINDS:
        raise ValueError(f"unknown prefilter {kind!r} (one of {', '.join(KINDS)})")
    clauses = flt.prefilter_literals
    if clauses is None:  # the filter cannot be screened: every line is examined
        flt.set_prefilter("none")
        return
    firsts = sorted({c[0] for c in clauses}, key=len, reverse=True)
    search: Callable[[str], object]
    if kind == "re":
        search = re.compile("|".join(map(re.escape, firsts))).search
    elif kind == "re2":
        import re2

        search = re2.compile("|".join(map(re.escape, firsts))).search
    else:
        search = hyperscan_scanner(firsts)

    def scan(line: str) -> bool:
        return bool(search(line)) and any_clause(clauses, line)

    flt.set_screen(kind, scan)


def any_clause(clauses: Sequence[tuple[str, ...]], line: str) -> bool:
    """Does `line` hold every word of some clause?"""
    return any(all(w in line for w in clause) for clause in clauses)


def hyperscan_scanner(literals: Sequence[str]) -> Callable[[str], bool]:
    """True for a line that contains one of `literals` (Intel Hyperscan, block mode)."""
    import hyperscan

    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    exprs = [re.escape(x).encode("utf-8") for x in literals]
    db.compile(expressions=exprs, ids=list(range(len(exprs))),
               elements=len(exprs), flags=[hyperscan.HS_FLAG_SINGLEMATCH] * len(exprs))
    db.scratch = hyperscan.Scratch(db)

    def scan(line: str) -> bool:
        hit = False

        def on_match(*_args: Any) -> bool:
            nonlocal hit
            hit = True
            return True  # stop at the first hit

        try:
            db.scan(line.encode("utf-8", "surrogateescape"), match_event_handler=on_match)
        except hyperscan.ScanTerminated:
            pass
        except Exception:
            return True  # never lose a line to the scanner
        return hit

    return scan
