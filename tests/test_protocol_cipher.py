"""Protocol 4's negotiated cipher over real TCP: the server names it in CHALLENGE, both ends
seal with it, a worker set to another is refused by name, and a CHALLENGE rewritten on the
way fails the session instead of downgrading it."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from smolcluster.cipher import AES, AUTO, CHACHA, CIPHERS
from smolcluster.harness import LocalCluster
from smolcluster.protocol import (
    HEADER,
    TAG_LEN,
    BadTag,
    Broadcast,
    MsgType,
    ProtocolError,
    Refused,
    WrongCipher,
    WrongSecret,
    client_handshake,
    server_handshake,
)
from tests.test_protocol import MAX_FRAME, SECRET, authenticated_pair, handshake_key, tcp_pair

OTHER = {AES: CHACHA, CHACHA: AES}
CLASSES = {AES: AESGCM, CHACHA: ChaCha20Poly1305}  # what each name must seal with


def serve_once(sock: socket.socket, cipher: str, box: dict) -> threading.Thread:
    """A server thread: one handshake sealing with `cipher`, then WELCOME, then one frame."""

    def serve() -> None:
        try:
            conn, _ = server_handshake(sock, SECRET, MAX_FRAME, "test", cipher=cipher)
            conn.send(MsgType.WELCOME, {})
            box["server"] = conn
            box["frame"] = conn.recv()
        except ProtocolError as exc:
            box["error"] = exc
        finally:
            sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


@pytest.mark.parametrize("cipher", CIPHERS)
def test_either_cipher_seals_every_frame_and_the_broadcast(cipher: str) -> None:
    broadcast = Broadcast(cipher)
    client, server = authenticated_pair({"broadcast_key": broadcast.key.hex()}, cipher=cipher)
    assert client.cipher == server.cipher == cipher
    for conn in (client, server):  # both directions under the named class
        assert type(conn._send_aead) is CLASSES[cipher]
        assert type(conn._recv_aead) is CLASSES[cipher]
    assert type(client._broadcast) is CLASSES[cipher]
    assert type(broadcast._aead) is CLASSES[cipher]
    grads = torch.randn(10_000)
    client.send(MsgType.GRADS, {"step": 3}, grads.numpy())
    assert bytes(server.recv().payload) == grads.numpy().tobytes()
    average, target = torch.randn(10_000), torch.zeros(10_000)
    once = broadcast.seal(MsgType.AVERAGE, 3, average.numpy())
    server.send(MsgType.AVERAGE, {"step": 3}, sealed=once)
    client.recv({MsgType.AVERAGE: memoryview(target.numpy())})
    assert torch.equal(target, average)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_a_worker_set_to_the_servers_cipher_is_admitted(cipher: str) -> None:
    a, b = tcp_pair()
    box: dict = {}
    thread = serve_once(b, cipher, box)
    client, _ = client_handshake(a, SECRET, {"host": "t"}, MAX_FRAME, "test", cipher=cipher)
    client.send(MsgType.HEARTBEAT)
    thread.join()
    assert client.cipher == cipher and box["frame"].type == MsgType.HEARTBEAT


@pytest.mark.parametrize("cipher", CIPHERS)
def test_a_worker_set_to_another_cipher_is_refused_naming_both(cipher: str) -> None:
    a, b = tcp_pair()
    box: dict = {}
    thread = serve_once(b, cipher, box)
    worker = OTHER[cipher]
    with pytest.raises(Refused) as refused:
        client_handshake(a, SECRET, {"host": "t"}, MAX_FRAME, "test", cipher=worker)
    thread.join()
    expected = f"cipher: the server seals with {cipher}, this worker is configured for {worker}"
    assert str(refused.value).startswith(f"server refused us: {expected};")
    assert "\n" not in str(refused.value)
    assert isinstance(box["error"], WrongCipher) and expected in str(box["error"])
    assert "server" not in box  # no session


def _read_frame(sock: socket.socket) -> bytes:
    head = _read(sock, HEADER.size)
    meta_len = HEADER.unpack(head)[5]
    return head + _read(sock, meta_len + TAG_LEN)  # a handshake frame: no payload


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def downgrading_proxy(server_port: int, rewrite: Callable[[bytes], bytes]) -> tuple[int, list]:
    """A man in the middle on loopback: relays both ways, the server's first frame (its
    CHALLENGE) through `rewrite`. Returns its port and the CHALLENGEs it saw."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def run() -> None:
        inner, _ = listener.accept()
        listener.close()
        outer = socket.create_connection(("127.0.0.1", server_port))
        threading.Thread(target=_pipe, args=(inner, outer), daemon=True).start()
        try:
            challenge = _read_frame(outer)
            seen.append(challenge)
            inner.sendall(rewrite(challenge))
        except OSError:
            return
        _pipe(outer, inner)

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1], seen


def renamed(challenge: bytes, cipher: str, s2c_key: bytes | None) -> bytes:
    """The CHALLENGE naming `cipher`; its tag recomputed under `s2c_key` (an attacker who
    has the handshake keys), else left as it was."""
    head, meta = challenge[: HEADER.size], challenge[HEADER.size : -TAG_LEN]
    fields = json.loads(meta)
    fields["cipher"] = cipher
    meta = json.dumps(fields, separators=(",", ":")).encode()
    magic, version, mtype, flags, seq, _, payload_len = HEADER.unpack(head)
    head = HEADER.pack(magic, version, mtype, flags, seq, len(meta), payload_len)
    tag = challenge[-TAG_LEN:]
    if s2c_key is not None:
        tag = hmac.new(s2c_key, head + meta, hashlib.sha256).digest()
    return head + meta + tag


S2C = handshake_key(SECRET, "s2c")


def through_rewriting_proxy(
    name: str, s2c_key: bytes | None, cipher: str = AUTO
) -> tuple[ProtocolError, dict, list[bytes]]:
    """A worker set to `cipher` dials an AES-256-GCM server through a proxy that renames the
    cipher in CHALLENGE to `name`: what the worker raised, the server's box, the CHALLENGEs
    the proxy saw."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port, seen = downgrading_proxy(
            listener.getsockname()[1], lambda frame: renamed(frame, name, s2c_key)
        )
        worker = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
    box: dict = {}
    thread = serve_once(served, AES, box)
    try:
        client_handshake(worker, SECRET, {"host": "t"}, MAX_FRAME, "test", cipher=cipher)
    except ProtocolError as exc:
        raised = exc
    else:
        raise AssertionError("the worker got a session through the rewritten CHALLENGE")
    finally:
        worker.close()
    thread.join(timeout=15)
    assert json.loads(seen[0][HEADER.size : -TAG_LEN])["cipher"] == AES  # what the server said
    assert "frame" not in box  # the server never got a frame in a session
    return raised, box, seen


def test_a_rewritten_cipher_in_challenge_fails_its_tag() -> None:
    """Without the handshake keys the proxy's CHALLENGE fails its HMAC: no session."""
    raised, box, _ = through_rewriting_proxy(CHACHA, None)
    assert isinstance(raised, WrongSecret)
    assert isinstance(box["error"], ProtocolError)


def test_a_rewritten_and_retagged_cipher_fails_the_first_sealed_frame() -> None:
    """With the handshake keys (re-tagged), the worker seals with the name it was given under
    keys from what it received, the server under keys from what it sent: WELCOME, the first
    sealed frame, does not open. No downgrade."""
    raised, box, _ = through_rewriting_proxy(CHACHA, S2C)
    assert isinstance(raised, BadTag) and "bad tag on WELCOME frame 1" in str(raised)
    assert isinstance(box["error"], ProtocolError)


def test_a_challenge_naming_another_cipher_than_the_workers_own_is_refused() -> None:
    raised, _, _ = through_rewriting_proxy(CHACHA, S2C, cipher=AES)
    assert isinstance(raised, WrongCipher)
    assert "the server seals with chacha20-poly1305, this worker is configured for " in str(raised)


def test_a_challenge_naming_no_known_cipher_is_refused() -> None:
    raised, _, _ = through_rewriting_proxy("rot13", S2C)
    assert "handshake names no cipher we know ('rot13')" in str(raised)


# -- real processes --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("cipher", CIPHERS)
def test_a_run_trains_sealed_with_either_cipher(
    tmp_path: Path, offline_digits_root: Path, cipher: str
) -> None:
    cluster = LocalCluster(
        tmp_path,
        offline_digits_root,
        workers=2,
        cluster={"cipher": cipher},
        nn={"max_steps": 5, "eval_steps": 5},
    )
    cluster.start()
    assert cluster.wait(180) == {"mini1": 0, "mini2": 0, "mini3": 0}, cluster.logs()
    assert f"sealing with {cipher}" in cluster.log("mini1")
    assert cluster.summary()["steps"] == 5
    assert cluster.summary()["checksum_mismatches"] == 0


@pytest.mark.slow
def test_a_worker_configured_for_another_cipher_stops_with_one_line(
    tmp_path: Path, offline_digits_root: Path
) -> None:
    """The server seals with AES-256-GCM; a worker whose own config says ChaCha20-Poly1305
    exits 1 at once (no redialling) with one line naming the key and both values."""
    cluster = LocalCluster(
        tmp_path, offline_digits_root, workers=1, cluster={"cipher": AES, "join_timeout_s": 60.0}
    )
    own = tmp_path / "worker_cluster_config.yaml"
    own.write_text(yaml.safe_dump({**cluster.cluster_config, "cipher": CHACHA}))
    cluster.spawn("mini1", "server")
    cluster.wait_for_server_port()
    command = cluster.command("worker", "--host", "mini2")
    command[command.index(str(cluster.cluster_file))] = str(own)
    worker = cluster.start_process("mini2", command)
    try:
        assert worker.wait(timeout=60) == 1, cluster.logs()
    finally:
        cluster.stop()
    expected = (
        "server refused us: cipher: the server seals with aes-256-gcm, this worker is "
        "configured for chacha20-poly1305; set the same cipher (or auto) on every host"
    )
    lines = [line for line in cluster.log("mini2").splitlines() if "cipher" in line]
    assert len(lines) == 1 and lines[0].endswith(expected), cluster.log("mini2")
    assert "cipher: the server seals with aes-256-gcm" in cluster.log("mini1")
