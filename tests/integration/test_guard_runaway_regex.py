"""A jail whose failregex backtracks catastrophically does not freeze the edge.

The running edge follows a log with a user failregex that takes hours on a
line of x's; while its matcher process chews on such lines, connections keep
being relayed with no stall, each runaway batch is cut at match_timeout and
counted, later lines still ban, and no matcher process outlives the edge.
"""

import os
import threading
import time
from pathlib import Path

from support import (
    EdgeProcess,
    ThreadServer,
    connect_from,
    echo_handler,
    free_port,
    served,
    wait_until,
)

RUNAWAY_RX = r"^(x+x+)+y from <HOST>$"
BAD_LINE = "x" * 40 + "z y from 127.0.0.99\n"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_edge_keeps_relaying_while_a_jail_chews_on_a_runaway_regex(tmp_path: Path) -> None:
    up = ThreadServer(echo_handler())
    port = free_port()
    log = tmp_path / "app.log"
    log.write_text("")
    edge = EdgeProcess(tmp_path, f"""
[guard]
match_timeout = "1s"

[services.app]
listen = ["127.0.0.1:{port}"]
to = "127.0.0.1:{up.port}"

[jails.runaway]
logpath = ["{log}"]
failregex = ["{RUNAWAY_RX}"]
maxretry = 2
findtime = "5m"
bantime = -1
""", wait=[("127.0.0.1", port)])
    try:
        def guard() -> dict:  # type: ignore[type-arg]
            return edge.api("GET", "/guard")[1]  # type: ignore[return-value]

        matcher = guard()["matcher"]
        assert matcher["isolation"] == "process" and matcher["timeout"] == 1.0
        first_pid = int(matcher["pid"])
        assert alive(first_pid)

        # A client relaying through the edge all along: every round trip must be quick.
        rtts: list[float] = []
        failures: list[str] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    with connect_from("127.0.0.10", port) as c:
                        c.sendall(b"ping")
                        if c.recv(4) != b"ping":
                            failures.append("no echo")
                except OSError as e:
                    failures.append(repr(e))
                rtts.append(time.monotonic() - t0)
                time.sleep(0.01)

        t = threading.Thread(target=client, daemon=True)
        t.start()
        t0 = time.monotonic()
        for _ in range(2):  # two runaway batches back to back: ~2 s of a regex that never ends
            with log.open("a") as f:
                f.write(BAD_LINE)
            assert wait_until(lambda n=_ + 1: guard()["jails"][0]["counters"]["filter_timeouts"] >= n, timeout=10.0)
        elapsed = time.monotonic() - t0
        stop.set()
        t.join(5)
        assert elapsed >= 1.8  # the matcher really was stuck for both deadlines
        assert failures == []
        assert len(rtts) >= elapsed / 0.1, len(rtts)
        assert max(rtts) < 0.5, max(rtts)  # a frozen loop would show a ≥1 s round trip (2 CPUs, one spinning)

        (jail,) = guard()["jails"]
        assert jail["counters"]["filter_timeouts"] == 2 and jail["counters"]["matches"] == 0
        assert not alive(first_pid)  # killed at the deadline, replaced
        assert edge.log().count("took longer than 1s") == 1  # logged once per jail
        assert "(x+x+)+y" in edge.log()

        # The jail still works: good lines ban, and the ban is enforced at admit.
        with log.open("a") as f:
            f.write("xxy from 127.0.0.66\n" * 2)
        assert wait_until(lambda: not served("127.0.0.66", port), timeout=10.0), "not banned after the runaway"
        assert served("127.0.0.10", port)
        assert served("127.0.0.99", port)  # the runaway line banned nobody
        last_pid = int(guard()["matcher"]["pid"])
        assert last_pid != first_pid and guard()["matcher"]["restarts"] == 2
    finally:
        edge.stop()
        up.close()
    assert not alive(last_pid)
