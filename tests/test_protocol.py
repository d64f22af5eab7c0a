"""The wire protocol over real TCP: exact round trips, and every kind of bad input refused."""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from smolcluster.harness import LocalCluster
from smolcluster.protocol import (
    HEADER,
    MAGIC,
    TAG_LEN,
    VERSION,
    Connection,
    MsgType,
    ProtocolError,
    client_handshake,
    read_secret,
    server_handshake,
    write_secret,
)

SECRET = os.urandom(32).hex().encode()
MAX_FRAME = 64 * 1024 * 1024


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def authenticated_pair() -> tuple[Connection, Connection]:
    a, b = tcp_pair()
    box: dict[str, Connection] = {}

    def serve() -> None:
        conn, _ = server_handshake(b, SECRET, MAX_FRAME, "test")
        conn.send(MsgType.WELCOME, {})  # the server admits the client
        box["server"] = conn

    thread = threading.Thread(target=serve)
    thread.start()
    client, _ = client_handshake(a, SECRET, {"host": "t"}, MAX_FRAME, "test")
    thread.join()
    return client, box["server"]


def test_tensors_round_trip_bit_exact() -> None:
    client, server = authenticated_pair()
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3.4e38])
    tensors = [
        torch.randn(339_210),
        special,
        torch.randn(7).double(),
        torch.randint(-128, 127, (1000,), dtype=torch.int8),
        torch.empty(0),
    ]
    for tensor in tensors:
        client.send(MsgType.GRADS, {"step": 1, "dtype": str(tensor.dtype)}, tensor.numpy())
        frame = server.recv()
        assert frame.type == MsgType.GRADS and frame.meta["dtype"] == str(tensor.dtype)
        assert bytes(frame.payload) == tensor.numpy().tobytes()
    # Straight into a preallocated buffer, as workers receive averages.
    target = torch.zeros(339_210)
    source = torch.randn(339_210)
    server.send(MsgType.AVERAGE, {"step": 1}, source.numpy())
    client.recv({MsgType.AVERAGE: memoryview(target.numpy())})
    assert torch.equal(target, source)
    assert client.bytes_sent > 339_210 * 4 and server.bytes_recv == client.bytes_sent


def _raw_frames(count: int) -> tuple[Connection, list[bytes]]:
    """Capture the exact bytes of `count` frames a sender writes, and a fresh receiver."""
    sender_sock, capture = tcp_pair()
    sender = Connection(sender_sock, b"k" * 32, b"k" * 32, MAX_FRAME, "sender")
    frames = []
    for i in range(count):
        payload = torch.full((10,), float(i)).numpy()
        sender.send(MsgType.GRADS, {"step": i}, payload)
        size = HEADER.size + len(b'{"step":0}') + 40 + TAG_LEN
        data = b""
        while len(data) < size:
            data += capture.recv(size - len(data))
        frames.append(data)
    feed, receiver_sock = tcp_pair()
    receiver = Connection(receiver_sock, b"k" * 32, b"k" * 32, MAX_FRAME, "receiver")
    receiver._feed = feed  # keep the writing end alive
    return receiver, frames


def test_replayed_and_reordered_frames_are_refused() -> None:
    receiver, (first, second) = _raw_frames(2)
    receiver._feed.sendall(second)
    with pytest.raises(ProtocolError, match="sequence"):
        receiver.recv()
    receiver, (first, _) = _raw_frames(2)
    receiver._feed.sendall(first + first)
    assert receiver.recv().meta == {"step": 0}
    with pytest.raises(ProtocolError, match="sequence"):
        receiver.recv()


def test_tampered_frame_is_refused() -> None:
    receiver, (first,) = _raw_frames(1)
    tampered = bytearray(first)
    tampered[-TAG_LEN - 1] ^= 1  # one bit of the payload
    receiver._feed.sendall(bytes(tampered))
    with pytest.raises(ProtocolError, match="bad HMAC"):
        receiver.recv()


def test_wrong_secret_is_refused() -> None:
    a, b = tcp_pair()
    errors: list[Exception] = []

    def serve() -> None:
        try:
            server_handshake(b, SECRET, MAX_FRAME, "test")
        except ProtocolError as exc:
            errors.append(exc)
            b.close()

    thread = threading.Thread(target=serve)
    thread.start()
    with pytest.raises(ProtocolError):
        client_handshake(a, os.urandom(32).hex().encode(), {"host": "x"}, MAX_FRAME, "test")
    thread.join()
    assert errors  # the HELLO MAC under the wrong secret fails at once


def test_secret_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    write_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(read_secret(path)) == 64
    path.chmod(0o644)
    with pytest.raises(ProtocolError, match="chmod 600"):
        read_secret(path)


# -- a live server under attack while a legitimate worker trains ---------------------------


def _header(
    mtype: int = MsgType.HELLO,
    meta_len: int = 2,
    payload_len: int = 0,
    magic: bytes = MAGIC,
    version: int = VERSION,
    seq: int = 0,
) -> bytes:
    return HEADER.pack(magic, version, mtype, 0, seq, meta_len, payload_len)


def _attack(port: int, data: bytes, linger: float = 0.0) -> str:
    """Send bytes, then report whether the server closed the connection on us."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    if data:
        sock.sendall(data)
    time.sleep(linger)
    try:
        while sock.recv(65536):
            pass  # a CHALLENGE, perhaps; what matters is that the server hangs up
        closed = "closed"
    except (ConnectionResetError, TimeoutError) as exc:
        closed = type(exc).__name__
    finally:
        sock.close()
    return closed


def _record_handshake(port: int, secret: bytes) -> bytes:
    """Run a genuine handshake through a recording relay; return what the client sent."""
    relay = socket.create_server(("127.0.0.1", 0))
    sent = bytearray()

    def pump() -> None:
        inner, _ = relay.accept()
        outer = socket.create_connection(("127.0.0.1", port))
        inner.settimeout(3)
        outer.settimeout(3)
        try:
            for _ in range(2):  # HELLO, then AUTH
                data = inner.recv(65536)
                sent.extend(data)
                outer.sendall(data)
                inner.sendall(outer.recv(65536))
        except OSError:
            pass
        finally:
            outer.close()
            inner.close()

    thread = threading.Thread(target=pump)
    thread.start()
    client = socket.create_connection(relay.getsockname())
    with contextlib.suppress(ProtocolError):  # rejected as an unknown host: we want the bytes
        client_handshake(
            client, secret, {"host": "intruder", "rank": 9, "mode": "sync"}, MAX_FRAME, "relay"
        )
    thread.join()
    relay.close()
    return bytes(sent)


class EvilWorker:
    """Knows the secret, joins as a real worker, then misbehaves once training has started."""

    def __init__(self, cluster: LocalCluster, host: str) -> None:
        sock = socket.create_connection(("127.0.0.1", cluster.port))
        self.conn, _ = client_handshake(
            sock,
            cluster.secret,
            {"host": host, "rank": cluster.workers.index(host) + 1, "mode": "sync"},
            MAX_FRAME,
            host,
        )

    def wait_for_start(self) -> None:
        assert self.conn.recv().type == MsgType.START


@pytest.mark.slow
def test_bad_input_closes_only_that_connection(tmp_path: Path, offline_digits_root: Path) -> None:
    cluster = LocalCluster(
        tmp_path,
        offline_digits_root,
        workers=3,
        cluster={"handshake_timeout_s": 2.0, "min_workers": 1, "max_frame_bytes": 1 << 24},
        nn={"max_steps": 80, "eval_steps": 40},
    )
    cluster.spawn("mini1", "server")
    cluster.wait_for_server_port()
    wrong_type = EvilWorker(cluster, "mini3")
    bad_mac = EvilWorker(cluster, "pi5")
    legit = cluster.spawn("mini2", "worker", "--host", "mini2", "--throttle-s", "0.1")
    wrong_type.wait_for_start()
    bad_mac.wait_for_start()
    # Authenticated peers that break the protocol are dropped at once, nobody else is.
    wrong_type.conn.send(MsgType.PUSH, {"step": 0}, b"\0" * 8)
    bad_mac.conn._send_key = os.urandom(32)
    bad_mac.conn.send(MsgType.GRADS, {"step": 0, "samples": 32, "loss": 1.0})

    port = cluster.port
    genuine = _record_handshake(port, cluster.secret)
    attacks = {
        "bad magic": _header(magic=b"EVIL") + b"{}" + bytes(TAG_LEN),
        "wrong version": _header(version=99) + b"{}" + bytes(TAG_LEN),
        "oversized": _header(payload_len=1 << 40),
        "truncated": _header()[:10],
        "bad HMAC": _header() + b"{}" + bytes(TAG_LEN),
        "unknown type": _header(mtype=200) + b"{}" + bytes(TAG_LEN),
        "random bytes": os.urandom(4096),
        "pickle": struct.pack("!I", 40) + pickle.dumps({"command": "register", "rank": 1}),
        "replayed handshake": genuine,
        "silent": b"",
    }
    outcomes = {name: _attack(port, data, linger=0.2) for name, data in attacks.items()}
    assert all(outcome in ("closed", "ConnectionResetError") for outcome in outcomes.values()), (
        outcomes
    )

    assert legit.wait(timeout=600) == 0, cluster.logs()
    assert cluster.procs["mini1"].wait(timeout=120) == 0, cluster.log("mini1")
    summary = cluster.summary()
    assert summary["steps"] == 80
    assert summary["workers"]["mini2"]["steps"] == 80
    assert cluster.events("mini1", "step")[-1]["workers"] == 1
    log = cluster.log("mini1")
    for reason in (
        "bad magic",
        "protocol version 99",
        "exceeds the limit",
        "bad HMAC",
        "unknown message type 200",
        "authentication failed",
        "timed out",
    ):
        assert reason in log, f"no log line for {reason!r}:\n{log}"
    assert "dropped mini3(rank 2): unexpected PUSH" in log
    assert "dropped pi5(rank 3): bad HMAC" in log
