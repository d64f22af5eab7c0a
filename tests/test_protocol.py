"""The wire protocol over real TCP: exact round trips, and every kind of bad input refused."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import pickle
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from smolcluster.cipher import CHACHA
from smolcluster.harness import LocalCluster
from smolcluster.protocol import (
    HEADER,
    MAGIC,
    SEAL_TAG,
    TAG_LEN,
    VERSION,
    BadTag,
    Broadcast,
    Connection,
    MsgType,
    ProtocolError,
    WrongVersion,
    client_handshake,
    read_secret,
    server_handshake,
    write_secret,
)

SECRET = os.urandom(32).hex().encode()
MAX_FRAME = 64 * 1024 * 1024


def handshake_key(secret: bytes, direction: str) -> bytes:
    """A handshake frame's HMAC key ("c2s" or "s2c") as any peer derives it from the secret
    (docs/protocol.md): spelled out here, as an old or hostile peer would, not taken from
    protocol.py."""
    return hmac.new(
        secret, f"smolcluster/1 handshake {direction}".encode(), hashlib.sha256
    ).digest()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def authenticated_pair(
    welcome: dict | None = None, cipher: str = CHACHA
) -> tuple[Connection, Connection]:
    a, b = tcp_pair()
    box: dict[str, Connection] = {}

    def serve() -> None:
        conn, _ = server_handshake(b, SECRET, MAX_FRAME, "test", cipher=cipher)
        conn.send(MsgType.WELCOME, welcome or {})  # the server admits the client
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


def frame_bytes(conn: Connection, mtype: MsgType, meta: dict, payload=b"", **kw) -> bytes:
    """The exact bytes `conn` would write for one frame (its sequence number advances)."""
    parts: list[bytes] = []
    conn._sendmsg = lambda views: parts.extend(bytes(v) for v in views)  # type: ignore[method-assign]
    try:
        conn.send(mtype, meta, payload, **kw)
    finally:
        del conn._sendmsg
    return b"".join(parts)


def sealed(conn: Connection, send_key: bytes, recv_key: bytes) -> Connection:
    conn.rekey(send_key, recv_key)  # as at the end of a handshake
    return conn


def _raw_frames(count: int) -> tuple[Connection, list[bytes]]:
    """The exact bytes of `count` sealed frames a sender writes, and a fresh receiver."""
    sender_sock, _ = tcp_pair()
    sender = sealed(Connection(sender_sock, b"", b"", MAX_FRAME, "sender"), b"a" * 32, b"b" * 32)
    frames = []
    for i in range(count):
        payload = torch.full((10,), float(i)).numpy()
        frames.append(frame_bytes(sender, MsgType.GRADS, {"step": i}, payload))
        assert len(frames[-1]) == HEADER.size + len(b'{"step":0}') + SEAL_TAG + 40 + SEAL_TAG
    feed, receiver_sock = tcp_pair()
    receiver = sealed(Connection(receiver_sock, b"", b"", MAX_FRAME, "r"), b"b" * 32, b"a" * 32)
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


def test_a_reordered_frame_fails_authentication_even_with_the_expected_seq() -> None:
    receiver, (_, second) = _raw_frames(2)
    relabelled = bytearray(second)
    relabelled[8:16] = (0).to_bytes(8, "big")  # claims to be frame 0
    receiver._feed.sendall(bytes(relabelled))
    with pytest.raises(BadTag, match="bad tag on GRADS frame 0"):
        receiver.recv()


@pytest.mark.parametrize(
    ("where", "error"),
    [(HEADER.size + 2, "bad tag on GRADS"), (-SEAL_TAG - 1, "bad tag on the payload")],
)
def test_tampered_ciphertext_is_refused(where: int, error: str) -> None:
    receiver, (first,) = _raw_frames(1)
    tampered = bytearray(first)
    tampered[where] ^= 1  # one bit of the sealed metadata, or of the sealed payload
    receiver._feed.sendall(bytes(tampered))
    with pytest.raises(BadTag, match=error):
        receiver.recv()


def test_frames_are_encrypted_on_the_wire() -> None:
    client, server = authenticated_pair()
    secret_meta, payload = "loss-0.123456", torch.arange(64, dtype=torch.float32).numpy()
    wire = frame_bytes(client, MsgType.GRADS, {"step": 0, "tag": secret_meta}, payload)
    assert secret_meta.encode() not in wire and payload.tobytes()[8:40] not in wire
    client.sock.sendall(wire)
    frame = server.recv()
    assert frame.meta["tag"] == secret_meta and bytes(frame.payload) == payload.tobytes()


def test_a_frame_from_another_connection_fails_authentication() -> None:
    """Same secret, same sequence number, another connection: its keys are not this one's."""
    client_a, _ = authenticated_pair()
    client_b, server_b = authenticated_pair()
    stolen = frame_bytes(client_a, MsgType.GRADS, {"step": 0}, bytes(40))
    client_b.sock.sendall(stolen)
    with pytest.raises(BadTag, match="bad tag on GRADS frame 2"):
        server_b.recv()


def test_one_broadcast_seal_opens_on_every_connection_for_its_step_only() -> None:
    broadcast = Broadcast()
    welcome = {"broadcast_key": broadcast.key.hex()}
    pairs = [authenticated_pair(welcome) for _ in range(2)]
    average = torch.randn(1000)
    once = broadcast.seal(MsgType.AVERAGE, 7, average.numpy())
    step7 = bytes(once.data)  # the broadcast buffer is reused by the next seal
    for client, server in pairs:
        target = torch.zeros(1000)
        server.send(MsgType.AVERAGE, {"step": 7}, sealed=once)
        frame = client.recv({MsgType.AVERAGE: memoryview(target.numpy())})
        assert frame.flags == 0 and torch.equal(target, average)
    with pytest.raises(ValueError, match="nonce reuse"):
        broadcast.seal(MsgType.AVERAGE, 7, average.numpy())
    # Step 7's sealed payload under step 8's (genuinely sealed) header and metadata.
    client, server = pairs[0]
    later = broadcast.seal(MsgType.AVERAGE, 8, average.numpy())
    wire = frame_bytes(server, MsgType.AVERAGE, {"step": 8}, sealed=later)
    server.sock.sendall(wire[: -len(step7)] + step7)
    with pytest.raises(BadTag, match="broadcast payload of AVERAGE step 8"):
        client.recv()


@pytest.mark.parametrize("version", [2, 3])
def test_an_old_version_peer_is_refused_with_a_reason_it_can_read(version: int) -> None:
    """A version-2 (or -3) worker's HELLO gets a REJECT of its version, tagged as it tags
    handshake frames (version 2 over SHA-256 of the empty payload, version 3 as 4 does)."""
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
    s2c = handshake_key(SECRET, "s2c")
    a.sendall(_old_version_hello(SECRET, version))
    reply = b""
    while chunk := a.recv(65536):
        reply += chunk
    thread.join()
    _, got_version, mtype, _, _, meta_len, _ = HEADER.unpack(reply[: HEADER.size])
    body = reply[HEADER.size : HEADER.size + meta_len]
    empty_payload = hashlib.sha256(b"").digest() if version == 2 else b""
    expected = hmac.new(s2c, reply[: HEADER.size] + body + empty_payload, hashlib.sha256)
    assert (got_version, mtype) == (version, MsgType.REJECT)
    assert reply[-TAG_LEN:] == expected.digest()
    assert f"protocol version {version}, expected 4".encode() in body
    assert b"older smolcluster" in body
    assert isinstance(errors[0], WrongVersion)
    assert f"protocol version {version}, expected 4" in str(errors[0])


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


def _old_version_hello(secret: bytes, version: int = 2) -> bytes:
    """A HELLO exactly as a version-2 (or -3) worker sends it: version 2 tags SHA-256 of the
    empty payload, version 3 no payload at all; neither names a cipher."""
    c2s = handshake_key(secret, "c2s")
    meta = b'{"host":"mini2","rank":1,"mode":"sync","nonce":"' + b"00" * 32 + b'"}'
    head = HEADER.pack(MAGIC, version, MsgType.HELLO, 0, 0, len(meta), 0)
    empty_payload = hashlib.sha256(b"").digest() if version == 2 else b""
    return head + meta + hmac.new(c2s, head + meta + empty_payload, "sha256").digest()


def _exchange(port: int, data: bytes) -> bytes:
    """Send bytes, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


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
        workers=6,  # mini2 trains; the other five are insiders, in this process
        cluster={"handshake_timeout_s": 2.0, "min_workers": 1, "max_frame_bytes": 1 << 24},
        nn={"max_steps": 80, "eval_steps": 40, "num_epochs": 2},  # 46 steps an epoch
    )
    cluster.spawn("mini1", "server")
    cluster.wait_for_server_port()
    insiders = {host: EvilWorker(cluster, host) for host in cluster.workers[1:]}
    # mini2 computes all six batches once the insiders are gone: 6 x 0.05 s a step, as before
    legit = cluster.spawn("mini2", "worker", "--host", "mini2", "--throttle-s", "0.05")
    for insider in insiders.values():
        insider.wait_for_start()
    # Authenticated peers that break the protocol are dropped at once, nobody else is.
    grads = {"step": 0, "samples": 32, "loss": 1.0}
    insiders["mini3"].conn.send(MsgType.PUSH, {"step": 0}, b"\0" * 8)
    insiders["pi5"].conn._send_aead = ChaCha20Poly1305(os.urandom(32))  # a key of its own
    insiders["pi5"].conn.send(MsgType.GRADS, grads)
    genuine = frame_bytes(insiders["pi4"].conn, MsgType.GRADS, grads, bytes(64))
    tampered = bytearray(genuine)
    tampered[-SEAL_TAG - 3] ^= 1  # one bit of the sealed payload
    insiders["pi4"].conn.sock.sendall(bytes(tampered))
    insiders["worker6"].conn.sock.sendall(genuine)  # pi4's frame, on another connection
    reordering = insiders["macbook"].conn
    frame_bytes(reordering, MsgType.HEARTBEAT, {})  # frame 2, never sent
    third = bytearray(frame_bytes(reordering, MsgType.GRADS, grads))
    third[8:16] = (2).to_bytes(8, "big")  # sent first, as if it were frame 2
    reordering.sock.sendall(bytes(third))

    port = cluster.port
    for version in (2, 3):  # an old worker is told why
        old = _old_version_hello(cluster.secret, version)
        assert b"older smolcluster" in _exchange(port, old)
    attacks = {
        "bad magic": _header(magic=b"EVIL") + b"{}" + bytes(TAG_LEN),
        "wrong version": _header(version=99) + b"{}" + bytes(TAG_LEN),
        "oversized": _header(payload_len=1 << 40),
        "truncated": _header()[:10],
        "bad HMAC": _header() + b"{}" + bytes(TAG_LEN),
        "unknown type": _header(mtype=200) + b"{}" + bytes(TAG_LEN),
        "random bytes": os.urandom(4096),
        "pickle": struct.pack("!I", 40) + pickle.dumps({"command": "register", "rank": 1}),
        "replayed handshake": _record_handshake(port, cluster.secret),
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
        "protocol version 2, expected 4",
        "protocol version 3, expected 4",
        "exceeds the limit",
        "bad HMAC",
        "unknown message type 200",
        "authentication failed",
        "timed out",
    ):
        assert reason in log, f"no log line for {reason!r}:\n{log}"
    assert "dropped mini3(rank 2): unexpected PUSH" in log
    assert "dropped pi5(rank 3): bad tag on GRADS frame 2" in log
    assert "dropped pi4(rank 4): bad tag on the payload of GRADS frame 2" in log
    assert "dropped macbook(rank 5): bad tag on GRADS frame 2" in log
    assert "dropped worker6(rank 6): bad tag on GRADS frame 2" in log
