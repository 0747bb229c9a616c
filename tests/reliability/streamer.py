"""An upstream for fault tests, as a process the test can kill -9: streams bytes to every client
and reads (and drops) what each client sends, so a kill finds data in flight both ways.

    python streamer.py PORT [--no-read]     prints READY once listening

With --no-read it never reads: what clients send piles up (a slow upload), so the edge holds
unread client bytes when the upstream dies.
"""

from __future__ import annotations

import socket
import sys
import threading


def serve(c: socket.socket, read: bool) -> None:
    def drain() -> None:
        try:
            while c.recv(65536):
                pass
        except OSError:
            pass

    if read:
        threading.Thread(target=drain, daemon=True).start()
    chunk = b"u" * 65536
    try:
        while True:
            c.sendall(chunk)
    except OSError:
        pass


def main() -> int:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen(64)
    print("READY", flush=True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c, "--no-read" not in sys.argv), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
