"""edgeward.handoff, the receiver library, against a sender written here from the protocol document:
real Unix and TCP sockets, no edge."""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeward.codec.handoff import Ack, HandoffRecord, build_record, parse_ack
from edgeward.handoff import HandoffReceiver, serve_handoffs


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
    yield client, server
    client.close()
    server.close()


def send_handoff(path: Path, record: bytes, fds: list[int], split: int | None = None) -> bytes:
    """Hand `fds` over with `record` (in two writes if `split`); the receiver's answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ctl:
        ctl.settimeout(5)
        ctl.connect(str(path))
        first = record if split is None else record[:split]
        try:
            ctl.sendmsg([first], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
            if split is not None:
                ctl.sendall(record[split:])
            return ctl.recv(16)
        except (BrokenPipeError, ConnectionResetError):  # the receiver closed without an answer
            return b""


def accept_until_closed(rx: HandoffReceiver) -> None:
    """rx.accept() on a thread, for handoffs it refuses: it ends when the test closes rx."""
    with contextlib.suppress(OSError):
        rx.accept()


REC = HandoffRecord("svc", ("192.0.2.1", 1234), ("127.0.0.1", 443), "tls", "a.example", ("h2",))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_blocking_accept_split_record(tmp_path: Path, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    path = tmp_path / "rx.sock"
    with HandoffReceiver(str(path)) as rx:
        assert oct(path.stat().st_mode & 0o777) == "0o660"
        got: list[tuple[socket.socket, HandoffRecord]] = []
        t = threading.Thread(target=lambda: got.append(rx.accept()))
        t.start()
        answer = send_handoff(path, build_record(REC), [server.fileno()], split=5)
        t.join(5)
    assert parse_ack(answer) is Ack.ACCEPTED
    sock, rec = got[0]
    with sock:
        assert rec == REC
        assert sock.getpeername() == client.getsockname()
        assert sock.gettimeout() is None
        client.sendall(b"x")
        assert sock.recv(1) == b"x"
    assert not path.exists()


@pytest.mark.parametrize("case", ["garbage", "no_fd", "two_fds", "not_tcp"])
def test_bad_handoffs_are_refused_and_leak_nothing(tmp_path: Path, tcp_pair: tuple[socket.socket, socket.socket],
                                                   case: str) -> None:
    _client, server = tcp_pair
    path = tmp_path / "rx.sock"
    before = fd_count()
    with HandoffReceiver(str(path)) as rx:
        done = threading.Event()

        def serve_one_good() -> None:
            sock, _ = rx.accept()  # skips the bad handoff, returns the good one after it
            sock.close()
            done.set()

        t = threading.Thread(target=serve_one_good)
        t.start()
        record, fds = build_record(REC), [server.fileno()]
        if case == "garbage":
            record = b"EWHO\x09" + record[5:]
        elif case == "no_fd":
            fds = []
        elif case == "two_fds":
            fds = [server.fileno(), server.fileno()]
        else:
            a, b = socket.socketpair()
            fds = [a.fileno()]
        answer = send_handoff(path, record, fds)
        assert parse_ack(answer) is Ack.BAD_RECORD
        if case == "not_tcp":
            a.close()
            b.close()
        assert parse_ack(send_handoff(path, build_record(REC), [server.fileno()])) is Ack.ACCEPTED
        t.join(5)
        assert done.is_set()
    assert fd_count() == before


def test_sender_of_another_uid_is_refused(tmp_path: Path, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    _client, server = tcp_pair
    path = tmp_path / "rx.sock"
    with HandoffReceiver(str(path), allowed_uids=[os.geteuid() + 12345], timeout=1) as rx:
        rx.sock.settimeout(2)
        ended: list[BaseException] = []

        def accept() -> None:
            try:
                rx.accept()  # skips the refused sender, then times out waiting for another
            except OSError as e:
                ended.append(e)

        t = threading.Thread(target=accept)
        t.start()
        assert send_handoff(path, build_record(REC), [server.fileno()]) == b""  # closed without an answer
        t.join(5)
        assert len(ended) == 1 and isinstance(ended[0], TimeoutError)


def test_decide_refuses(tmp_path: Path, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    _client, server = tcp_pair
    path = tmp_path / "rx.sock"
    with HandoffReceiver(str(path), decide=lambda r: Ack.UNKNOWN_SERVICE if r.service != "mine" else Ack.ACCEPTED) as rx:
        t = threading.Thread(target=accept_until_closed, args=(rx,))
        t.start()
        assert parse_ack(send_handoff(path, build_record(REC), [server.fileno()])) is Ack.UNKNOWN_SERVICE
        rx.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
    t.join(5)
    assert not t.is_alive()


async def test_asyncio_connect_accepted_socket(tmp_path: Path, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    path = tmp_path / "rx.sock"
    seen: list[tuple[HandoffRecord, object]] = []
    transports: list[asyncio.BaseTransport] = []

    class Echo(asyncio.Protocol):
        def __init__(self, rec: HandoffRecord) -> None:
            self.rec = rec

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            transports.append(transport)
            seen.append((self.rec, transport.get_extra_info("peername")))

        def data_received(self, data: bytes) -> None:
            self.transport.write(data.upper())  # type: ignore[attr-defined]

    srv = await serve_handoffs(str(path), Echo)
    try:
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, send_handoff, path, build_record(REC), [server.fileno()])
        assert parse_ack(answer) is Ack.ACCEPTED
        server.close()  # the sender's copy: the connection now lives in the receiver alone
        client.sendall(b"hello")
        client.settimeout(5)
        assert await loop.run_in_executor(None, client.recv, 10) == b"HELLO"
        assert seen == [(REC, client.getsockname())]
        assert srv.received == 1
    finally:
        for t in transports:
            t.close()
        srv.close()
        await asyncio.sleep(0)  # the transports' close callbacks
