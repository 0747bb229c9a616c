"""Coverage-guided fuzzing of every codec and of the guard's filter engine and date parser.

    python tests/fuzz/fuzzer.py --target all --runs 10000000 --merge     # what `make fuzz` runs
    python tests/fuzz/fuzzer.py --target tls --runs 50000                # one target, short

Targets: tls, proxy, http, xmpp, ssh, handoff, sniff (fuzz_codecs.py) and filter, date
(fuzz_guard.py). Each starts from its kept corpus, tests/fuzz/corpus/TARGET/
(small: minimized by libFuzzer's merge), and with --merge puts the inputs that
reached new coverage back into it, minimized again.

Engine: atheris (libFuzzer for Python; `pip install -e '.[fuzz]'`) with the
edgeward package instrumented for coverage. Without atheris, or with
--engine builtin, fuzz_codecs.py's mutation fuzzer runs over the same corpus
(no coverage feedback; a stand-in, said so in its output).

Per input: a hang is an input slower than --timeout seconds; memory is bounded
by --rss-limit-mb for the whole process. A crash, hang or memory blow-up exits
non-zero and leaves the input in --artifacts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CODEC_TARGETS = ("tls", "proxy", "http", "xmpp", "ssh", "handoff", "sniff")
GUARD_TARGETS = ("filter", "date")
ALL = CODEC_TARGETS + GUARD_TARGETS

sys.path.insert(0, str(HERE))


def load_targets() -> dict[str, Any]:
    """{name: fuzz_codecs.Target}; imports edgeward (so call it inside atheris.instrument_imports)."""
    codecs: ModuleType = importlib.import_module("fuzz_codecs")
    guard: ModuleType = importlib.import_module("fuzz_guard")
    targets: dict[str, Any] = dict(codecs.TARGETS)
    big = 1 << 62  # the guard's targets never answer NEED_MORE
    targets["filter"] = codecs.Target(guard.filter_lines, lambda: list(guard.FILTER_SEEDS), big)
    targets["date"] = codecs.Target(guard.date_lines, lambda: list(guard.DATE_SEEDS), big)
    return targets


def corpus_inputs(name: str, targets: dict[str, Any]) -> list[bytes]:
    """The kept corpus of a target, or its seeds when none is kept yet."""
    d = CORPUS / name
    kept = [p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()] if d.is_dir() else []
    return kept or list(targets[name].seeds())


def _atheris() -> Any:
    try:
        return importlib.import_module("atheris")
    except ImportError:
        return None


# ---------------------------------------------------------------------- one target, in process
def run_atheris(name: str, args: argparse.Namespace) -> None:
    """libFuzzer over one target; never returns (libFuzzer exits the process)."""
    atheris = _atheris()
    with atheris.instrument_imports(include=["edgeward"]):
        targets = load_targets()
    target = targets[name]
    codecs = sys.modules["fuzz_codecs"]

    def one_input(data: bytes) -> None:
        codecs.check(target, data)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = work / "seeds"
    if not seeds.exists():
        seeds.mkdir()
        for i, s in enumerate(target.seeds()):
            (seeds / f"seed{i}").write_bytes(s)
    dirs = [str(work / "new")]
    Path(dirs[0]).mkdir(exist_ok=True)
    kept = CORPUS / name
    if kept.is_dir():
        dirs.append(str(kept))
    dirs.append(str(seeds))
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    flags = [f"-rss_limit_mb={args.rss_limit_mb}", f"-timeout={args.timeout}",
             f"-artifact_prefix={args.artifacts.rstrip('/')}/{name}-", "-print_final_stats=1",
             f"-max_len={max_len(name, args)}"]
    # libFuzzer re-runs argv[0] for a merge (in a child, to survive a crashing input): a small
    # script that starts this driver again for the same target, passing libFuzzer's own flags.
    again = work / "again.sh"
    again.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" --target {name} '
                     f'--work "{work}" --engine atheris -- "$@"\n')
    again.chmod(0o755)
    if args.libfuzzer:
        argv = [str(again), *args.libfuzzer]
    elif args.merge_into:
        # Minimize: keep in merge_into only inputs that add coverage over what is already there.
        argv = [str(again), "-merge=1", *flags, args.merge_into, *dirs]
    else:
        argv = [str(again), f"-runs={args.runs}", *flags]
        if args.max_time:
            argv.append(f"-max_total_time={args.max_time}")
        if args.seed is not None:
            argv.append(f"-seed={args.seed}")
        argv += dirs
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def run_builtin(name: str, args: argparse.Namespace) -> int:
    codecs = importlib.import_module("fuzz_codecs")
    targets = load_targets()
    base = targets[name]
    inputs = corpus_inputs(name, targets)
    target = codecs.Target(base.parse, lambda: inputs, base.bound)
    started = time.monotonic()
    try:
        stats = codecs.run_target(target, args.runs, args.seed or 0)
    except codecs.Escaped as exc:
        print(f"FAIL {name}: {exc}", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    print(f"{name}: builtin mutation fuzzer (no coverage feedback): {stats.iterations} inputs in "
          f"{took:.1f}s from {len(inputs)} corpus inputs, {len(stats.outcomes)} distinct outcomes")
    return 0


def max_len(name: str, args: argparse.Namespace) -> int:
    if args.max_len:
        return int(args.max_len)
    return 4096 if name in GUARD_TARGETS else 20000


# ---------------------------------------------------------------------- every target, in subprocesses
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_RSS = re.compile(r"rss: (\d+)Mb")
_COV = re.compile(r"cov: (\d+)")
_SLOWEST = re.compile(r"slowest_unit_time_sec:\s+(\d+)")


def _child(name: str, args: argparse.Namespace, extra: list[str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--target", name, "--engine", args.engine,
            "--rss-limit-mb", str(args.rss_limit_mb), "--timeout", str(args.timeout),
            "--artifacts", args.artifacts, "--max-len", str(max_len(name, args)), *extra]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def run_many(names: list[str], args: argparse.Namespace) -> int:
    failed = 0
    print(f"{'target':8} {'runs':>11} {'seconds':>8} {'exec/s':>8} {'cov':>6} {'peak RSS':>9} "
          f"{'slowest':>8} {'corpus':>7}  result")
    for name in names:
        work = tempfile.mkdtemp(prefix=f"edgeward-fuzz-{name}-")
        try:
            extra = ["--runs", str(args.runs), "--work", work]
            if args.max_time:
                extra += ["--max-time", str(args.max_time)]
            if args.seed is not None:
                extra += ["--seed", str(args.seed)]
            t0 = time.monotonic()
            p = _child(name, args, extra)
            took = time.monotonic() - t0
            out = p.stdout + p.stderr
            Path(args.artifacts).mkdir(parents=True, exist_ok=True)
            (Path(args.artifacts) / f"{name}.log").write_text(out[-200_000:])
            done = _DONE.search(out)
            runs = int(done.group(1)) if done else 0
            rss = max((int(x) for x in _RSS.findall(out)), default=0)
            cov = max((int(x) for x in _COV.findall(out)), default=0)
            slowest = max((int(x) for x in _SLOWEST.findall(out)), default=0)
            ok = p.returncode == 0
            if ok and args.merge and args.engine != "builtin":
                ok = _merge(name, args, work)
            kept = len(list((CORPUS / name).glob("*"))) if (CORPUS / name).is_dir() else 0
            result = "ok" if ok else f"FAILED (exit {p.returncode}; see {args.artifacts}/{name}.log)"
            if not done and ok and args.engine == "builtin":
                runs = args.runs
            print(f"{name:8} {runs:>11,} {took:>8.0f} {runs / max(took, 1e-9):>8,.0f} {cov:>6} "
                  f"{rss:>7}MB {slowest:>7}s {kept:>7}  {result}", flush=True)
            failed += not ok
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _merge(name: str, args: argparse.Namespace, work: str) -> bool:
    """Minimize kept corpus + this run's new inputs into a fresh directory, then keep that."""
    fresh = Path(work) / "merged"
    fresh.mkdir()
    p = _child(name, args, ["--work", work, "--merge-into", str(fresh)])
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        return False
    kept = CORPUS / name
    kept.mkdir(parents=True, exist_ok=True)
    for old in kept.iterdir():
        old.unlink()
    for f in fresh.iterdir():
        shutil.copy(f, kept / f.name)
    return True


def main(argv: list[str] | None = None) -> int:
    # Coverage comes from instrumenting Python bytecode: the codecs run from their sources here, not
    # compiled by mypyc (edgeward/_native.py), in this process and the per-target children.
    os.environ.setdefault("EDGEWARD_PURE_PYTHON", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help=f"one of {', '.join(ALL)}, or all")
    ap.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS", "100000")))
    ap.add_argument("--max-time", type=int, default=0, help="stop a target after this many seconds (0: no limit)")
    ap.add_argument("--engine", choices=("auto", "atheris", "builtin"), default="auto")
    ap.add_argument("--merge", action="store_true", help="minimize new coverage into the kept corpus")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take (a hang)")
    ap.add_argument("--rss-limit-mb", type=int, default=1024)
    ap.add_argument("--max-len", type=int, help="longest input (default: 20000 for codecs, so a "
                    "16 KiB TLS record fits; 4096 for the guard's log lines)")
    ap.add_argument("--artifacts", default=str(Path(tempfile.gettempdir()) / "edgeward-fuzz-artifacts"))
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--merge-into", help=argparse.SUPPRESS)
    ap.add_argument("libfuzzer", nargs="*", help=argparse.SUPPRESS)  # after --: libFuzzer's flags
    args = ap.parse_args(argv)
    if args.engine == "auto":
        args.engine = "atheris" if _atheris() is not None else "builtin"
    if args.engine == "atheris" and _atheris() is None:
        ap.error("atheris is not installed (pip install -e '.[fuzz]')")
    names = list(ALL) if args.target == "all" else [args.target]
    if any(n not in ALL for n in names):
        ap.error(f"unknown target {args.target!r}")
    if args.work is None:
        return run_many(names, args)
    if args.engine == "builtin":
        return run_builtin(names[0], args)
    run_atheris(names[0], args)
    return 0  # not reached: libFuzzer exits


if __name__ == "__main__":
    sys.exit(main())
