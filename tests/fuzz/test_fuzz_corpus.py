"""CI's share of the fuzzing: every kept corpus input, then a bounded coverage-guided run per target.

`make fuzz` runs each target for millions of inputs and keeps what reached new
coverage in tests/fuzz/corpus/; here every kept input must still pass (a codec
change that breaks on one fails at once), and each target fuzzes on from the
corpus for a bounded number of inputs with atheris (the built-in mutator when
atheris is missing locally; under CI atheris is required).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
fuzzer = importlib.import_module("fuzzer")
codecs = importlib.import_module("fuzz_codecs")
TARGETS = fuzzer.load_targets()
RUNS = int(os.environ.get("FUZZ_CI_RUNS", "3000"))


def test_every_codec_and_guard_parser_has_a_target_and_a_kept_corpus() -> None:
    assert set(TARGETS) == set(fuzzer.ALL)
    for name in fuzzer.ALL:
        kept = list((fuzzer.CORPUS / name).glob("*"))
        assert kept, f"no kept corpus for {name}: run `make fuzz`"
        assert sum(p.stat().st_size for p in kept) < 1_000_000, f"{name}'s corpus is not minimized"


@pytest.mark.parametrize("name", fuzzer.ALL)
def test_kept_corpus_passes(name: str) -> None:
    target = TARGETS[name]
    inputs = fuzzer.corpus_inputs(name, TARGETS)
    outcomes = {codecs.check(target, data) for data in inputs}
    if name == "filter":  # the corpus reaches lines that match, and lines that do not
        counts = {target.parse(d).count for d in inputs}
        assert 0 in counts and max(counts) > 0, counts
    elif name == "date":  # ... dates parsed, dates found but impossible, bad patterns
        results = [target.parse(d) for d in inputs]
        assert any(r.parsed for r in results) and any(r.found > r.parsed for r in results)
        assert any(r.found < 0 for r in results)
    else:
        assert len(outcomes) > 1  # a value and errors


@pytest.mark.parametrize("name", fuzzer.ALL)
def test_bounded_fuzzing_from_the_corpus(name: str, tmp_path: Path) -> None:
    engine = "atheris" if fuzzer._atheris() is not None else "builtin"
    if engine == "builtin" and os.environ.get("CI"):
        pytest.fail("atheris is not installed (the fuzz extra: pip install -e '.[fuzz]')")
    p = subprocess.run(
        [sys.executable, str(HERE / "fuzzer.py"), "--target", name, "--runs", str(RUNS), "--engine", engine,
         "--artifacts", str(tmp_path), "--timeout", "10", "--rss-limit-mb", "1024"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    print(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert f"{RUNS:,}" in p.stdout or f"{RUNS} inputs" in p.stdout
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(name + "-")], "crash artifact left"
