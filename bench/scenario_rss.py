"""RSS at start with scenario 05's config: the 1 GB VPS edge of issue 11 (goal <= 32 MB).

Starts `edgeward run` on examples/05-home-server-behind-vps.toml as written, except where it
would reach outside this machine or need its paths: the listeners' `[::]` becomes 127.0.0.2
(same ports: 6 TCP and 303 UDP listeners), the home server 10.8.0.2 becomes 127.0.0.3 (nothing
listens there: health checks are refused on loopback), and the admin socket and state_dir go to
a temporary directory, fresh each round (an edge that never banned anything). VmRSS is read
2.5 s after the edge answers on its first TCP listener; medians of --rounds. Prints a JSON line.

    python bench/scenario_rss.py [--rounds 3]

Run as root (ports below 1024). Every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.http_layer import rss_kib  # noqa: E402
from bench.procs import stop_process  # noqa: E402

EXAMPLE = ROOT / "examples" / "05-home-server-behind-vps.toml"
SETTLE = 2.5


def rewrite(text: str, work: Path) -> str:
    text = text.replace("[::]:", "127.0.0.2:").replace("10.8.0.2", "127.0.0.3")
    text = re.sub(r'admin = "[^"]*"', f'admin = "unix:{work / "admin.sock"}"', text, count=1)
    return re.sub(r'state_dir = "[^"]*"', f'state_dir = "{work / "state"}"', text, count=1)


def first_tcp_port(text: str) -> int:
    m = re.search(r'"127\.0\.0\.2:(\d+)"', text)
    assert m is not None, "no TCP listener in the example"
    return int(m.group(1))


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.2", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def one_round() -> int:
    with tempfile.TemporaryDirectory(prefix="edgeward-rss-") as tmp:
        work = Path(tmp)
        cfg = work / "05.toml"
        text = rewrite(EXAMPLE.read_text(), work)
        cfg.write_text(text)
        port = first_tcp_port(text)
        with open(work / "edge.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "edgeward", "run", str(cfg)], stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not answers(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (work / "edge.log").read_text(errors="replace").splitlines()[-5:]
                    raise RuntimeError(f"the edge did not start (exit {proc.poll()}): {tail}")
                time.sleep(0.05)
            time.sleep(SETTLE)
            rss = rss_kib(proc.pid)
            if not rss:
                raise RuntimeError(f"no VmRSS for the edge (pid {proc.pid})")
            return rss
        finally:
            stop_process(proc, grace=15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    runs = []
    for i in range(args.rounds):
        runs.append(one_round())
        print(f"round {i + 1}: {runs[-1]:,} KiB", flush=True)
    result: dict[str, float] = {"scenario05_rss_start_kb": statistics.median(runs)}
    if len(runs) > 1:  # the bench runs one per round and takes its own min-max
        result.update(scenario05_rss_min_kb=min(runs), scenario05_rss_max_kb=max(runs))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
