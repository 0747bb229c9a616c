"""Filter line speed: edgeward's filter engine vs Debian's fail2ban-regex.

    python bench/jail_lines.py [--lines N] [--fail2ban-lines M] [--no-fail2ban]

Builds two logs of N lines in a temporary directory:

* prosody: a prosody file log (mod_log_auth enabled) with 10% failed logins
  from a few hundred addresses, the rest ordinary c2s/s2s/BOSH chatter;
* sshd: fail2ban's own sshd sample log (annotations dropped), repeated.

For each, it times edgeward three ways (Filter.process on every line read;
Filter.process_lines on batches of lines; Filter.process_text on 64 KiB
blocks) and ``fail2ban-regex`` on the same filter file
and log, checks that both found the same number of failures, and prints
lines/s and the ratio.  It also times edgeward with each pre-screening
strategy (required words with ``in``, one ``re`` alternation, google-re2,
Hyperscan, none; see bench/prefilters.py) so the default stays the measured
fastest.

The last line printed is one JSON object with all results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(1, str(ROOT))  # bench.prefilters, also when run as a script

from bench.prefilters import install as install_prefilter  # noqa: E402
from edgeward.guard.filter import EDGEWARD_FILTER_DIR, load_filter  # noqa: E402

SSHD_SAMPLE = Path("/usr/lib/python3/dist-packages/fail2ban/tests/files/logs/sshd")
SSHD_FILTER = Path("/etc/fail2ban/filter.d/sshd.conf")
PROSODY_FILTER = Path(EDGEWARD_FILTER_DIR) / "prosody-auth.conf"
NOW = time.time()


def make_prosody_log(path: Path, n: int, fail_ratio: float = 0.10, seed: int = 4) -> int:
    """Write n prosody lines; return how many are failed logins."""
    rnd = random.Random(seed)
    attackers = [f"198.51.100.{i}" for i in range(1, 255)] + [
        f"2001:db8::{i:x}" for i in range(1, 64)
    ]
    users = ["alice", "bob", "carol", "dave", "admin", "test", "root", "info"]
    chatter = [
        "{s}\tinfo\tClient connected",
        "{s}\tinfo\tClient disconnected: connection closed",
        "{s}\tinfo\tAuthenticated as {u}@example.org",
        "{s}\tinfo\tSuccessful authentication as {u}@example.org from IP: 192.0.2.{o}",
        "{s}\tdebug\tReceived[c2s]: <iq type='get' id='{o}'>",
        "{s}\tdebug\tSending[c2s]: <iq type='result' id='{o}'>",
        "s2sout{s}\tinfo\tOutgoing s2s connection example.org->example.net complete",
        "mod_bosh\tinfo\tNew BOSH session, assigned it sid '{s}'",
        "{s}\tinfo\tStream encrypted (TLSv1.3) with TLS_AES_256_GCM_SHA384",
        "example.org:tls\tinfo\tCertificates loaded",
    ]
    t0 = int(NOW) - n // 50
    fails = 0
    threshold = int(fail_ratio * 1000)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            ts = time.strftime("%b %d %H:%M:%S", time.localtime(t0 + i // 50))
            sess = f"c2s{rnd.getrandbits(48):012x}"
            if rnd.randrange(1000) < threshold:
                fails += 1
                fh.write(
                    f"{ts} {sess}\tinfo\tFailed authentication attempt (not-authorized) for user "
                    f"{rnd.choice(users)}@example.org from IP: {rnd.choice(attackers)}\n"
                )
            else:
                msg = rnd.choice(chatter).format(
                    s=sess, u=rnd.choice(users), o=rnd.randrange(1, 250)
                )
                fh.write(f"{ts} {msg}\n")
    return fails


def make_sshd_log(path: Path, n: int) -> None:
    """fail2ban's sshd sample (failJSON comments and blanks dropped), repeated to n lines."""
    lines = [
        ln
        for ln in SSHD_SAMPLE.read_text(encoding="utf-8", errors="replace").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(lines[i % len(lines)] + "\n")


def run_edgeward(flt_path: Path, log: Path, prefilter: str = "literal") -> dict[str, Any]:
    flt = load_filter(str(flt_path))
    install_prefilter(flt, prefilter)
    process = flt.process
    matches = 0
    lines = 0
    t0, c0 = time.perf_counter(), time.process_time()
    # what a jail does: read text lines, hand each to the filter
    with log.open("r", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            lines += 1
            if process(line, now=NOW):
                matches += 1
    return _rates(
        lines, matches, time.perf_counter() - t0, time.process_time() - c0, prefilter=prefilter
    )


def _rates(lines: int, matched: int, wall: float, cpu: float, **extra: Any) -> dict[str, Any]:
    """Rates per wall second and per CPU second of the measured side."""
    return {
        "lines": lines,
        "matched": matched,
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "lines_per_s": round(lines / wall) if wall else None,
        "lines_per_cpu_s": round(lines / cpu) if cpu else None,
        **extra,
    }


def run_edgeward_batched(flt_path: Path, log: Path, batch: int = 1024) -> dict[str, Any]:
    """Like a follower that hands over the lines it read in batches (process_lines)."""
    flt = load_filter(str(flt_path))
    matches = 0
    t0, c0 = time.perf_counter(), time.process_time()
    with log.open("r", encoding="utf-8", errors="surrogateescape") as fh:
        while True:
            lines = fh.readlines(batch * 100)
            if not lines:
                break
            matches += len(flt.process_lines(lines, now=NOW))
    return _rates(
        flt.stats["lines"],
        matches,
        time.perf_counter() - t0,
        time.process_time() - c0,
        mode="process_lines",
    )


def run_edgeward_chunked(flt_path: Path, log: Path, block: int = 1 << 16) -> dict[str, Any]:
    """Like a follower that reads the log in blocks and hands whole lines over."""
    flt = load_filter(str(flt_path))
    matches = 0
    t0, c0 = time.perf_counter(), time.process_time()
    with log.open("r", encoding="utf-8", errors="surrogateescape") as fh:
        tail = ""
        while True:
            chunk = fh.read(block)
            if not chunk:
                break
            chunk = tail + chunk
            cut = chunk.rfind("\n") + 1
            tail = chunk[cut:]
            if cut:
                matches += len(flt.process_text(chunk[:cut], now=NOW))
        if tail:
            matches += len(flt.process_text(tail, now=NOW))
    return _rates(
        flt.stats["lines"],
        matches,
        time.perf_counter() - t0,
        time.process_time() - c0,
        mode="process_text",
    )


_F2B_LINES = re.compile(r"Lines: (\d+) lines, (\d+) ignored, (\d+) matched, (\d+) missed")


def run_fail2ban(flt_path: Path, log: Path) -> dict[str, Any] | None:
    exe = shutil.which("fail2ban-regex")
    if exe is None:
        return None
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [exe, "--print-no-missed", "--print-no-ignored", "-r", str(log), str(flt_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    dt = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    m = _F2B_LINES.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        return {"error": (proc.stderr or proc.stdout)[-500:], "seconds": round(dt, 3)}
    return _rates(int(m.group(1)), int(m.group(3)), dt, cpu)


def bench_one(
    name: str, flt_path: Path, log: Path, f2b_log: Path | None, strategies: list[str]
) -> dict[str, Any]:
    res: dict[str, Any] = {"filter": str(flt_path)}
    ew = res["edgeward"] = run_edgeward(flt_path, log)
    print(
        f"[{name}] edgeward per line: {ew['lines_per_s']:,} lines/s "
        f"({ew['lines_per_cpu_s']:,}/CPU-s, {ew['matched']:,} matched)",
        flush=True,
    )
    ba = res["edgeward_batched"] = run_edgeward_batched(flt_path, log)
    print(
        f"[{name}] edgeward process_lines (~100 KiB batches): {ba['lines_per_s']:,} lines/s "
        f"({ba['lines_per_cpu_s']:,}/CPU-s)",
        flush=True,
    )
    ch = res["edgeward_chunked"] = run_edgeward_chunked(flt_path, log)
    print(
        f"[{name}] edgeward process_text (64 KiB blocks): {ch['lines_per_s']:,} lines/s "
        f"({ch['lines_per_cpu_s']:,}/CPU-s)",
        flush=True,
    )
    res["prefilters"] = {}
    for kind in strategies:
        try:
            r = run_edgeward(flt_path, log, kind)
        except ImportError as exc:
            res["prefilters"][kind] = {"error": f"not installed: {exc.name}"}
            continue
        res["prefilters"][kind] = r
        print(
            f"[{name}]   prefilter {kind:9s}: {r['lines_per_s']:,} lines/s "
            f"({r['lines_per_cpu_s']:,}/CPU-s)",
            flush=True,
        )
    if f2b_log is not None:
        f2b = run_fail2ban(flt_path, f2b_log)
        res["fail2ban_regex"] = f2b
        if f2b and f2b.get("lines_per_s") and f2b.get("lines_per_cpu_s"):
            res["ratio"] = round(ew["lines_per_s"] / f2b["lines_per_s"], 1)
            res["ratio_chunked"] = round(ch["lines_per_s"] / f2b["lines_per_s"], 1)
            # CPU seconds are the fairer basis on a shared machine: other load
            # slows wall-clock rates of both sides unevenly
            res["ratio_cpu"] = round(ew["lines_per_cpu_s"] / f2b["lines_per_cpu_s"], 1)
            res["ratio_chunked_cpu"] = round(ch["lines_per_cpu_s"] / f2b["lines_per_cpu_s"], 1)
            res["ratio_batched"] = round(ba["lines_per_s"] / f2b["lines_per_s"], 1)
            res["ratio_batched_cpu"] = round(ba["lines_per_cpu_s"] / f2b["lines_per_cpu_s"], 1)
            print(
                f"[{name}] fail2ban-regex: {f2b['lines_per_s']:,} lines/s "
                f"({f2b['lines_per_cpu_s']:,}/CPU-s, {f2b['matched']:,} matched)\n"
                f"[{name}] => edgeward/fail2ban-regex: per line {res['ratio']}x wall, "
                f"{res['ratio_cpu']}x CPU; batched {res['ratio_batched']}x wall, "
                f"{res['ratio_batched_cpu']}x CPU; in blocks {res['ratio_chunked']}x wall, "
                f"{res['ratio_chunked_cpu']}x CPU",
                flush=True,
            )
            if f2b_log == log and f2b["matched"] != ew["matched"]:
                # fail2ban-regex counts every line some failregex matched, including
                # <F-NOFAIL> lines and lines whose failure is only pending (<F-MLFID>),
                # and DNS names; edgeward counts failures it would count for a ban.
                res["matched_note"] = (
                    f"edgeward failures {ew['matched']} vs "
                    f"fail2ban-regex matched lines {f2b['matched']}"
                )
                print(f"[{name}] note: {res['matched_note']}", flush=True)
        elif f2b:
            print(f"[{name}] fail2ban-regex failed: {f2b.get('error')}", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument(
        "--fail2ban-lines",
        type=int,
        default=None,
        help="lines for fail2ban-regex (default: same log; fewer is faster, rate is per line)",
    )
    ap.add_argument("--no-fail2ban", action="store_true")
    ap.add_argument("--strategies", default="literal,re,re2,hyperscan,none")
    args = ap.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    out: dict[str, Any] = {"bench": "jail_lines", "lines": args.lines}
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-") as tmp:
        d = Path(tmp)
        cases = []
        plog = d / "prosody.log"
        out["prosody_failures_written"] = make_prosody_log(plog, args.lines)
        cases.append(("prosody", PROSODY_FILTER, plog))
        if SSHD_SAMPLE.is_file() and SSHD_FILTER.is_file():
            slog = d / "sshd.log"
            make_sshd_log(slog, args.lines)
            cases.append(("sshd", SSHD_FILTER, slog))
        for name, flt, log in cases:
            f2b_log: Path | None = None
            if not args.no_fail2ban:
                f2b_log = log
                if args.fail2ban_lines and args.fail2ban_lines < args.lines:
                    f2b_log = d / f"{name}.f2b.log"
                    with log.open() as src, f2b_log.open("w") as dst:
                        for i, line in enumerate(src):
                            if i >= args.fail2ban_lines:
                                break
                            dst.write(line)
            out[name] = bench_one(name, flt, log, f2b_log, strategies)
    out["python"] = sys.version.split()[0]
    out["cpus"] = os.cpu_count()
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
