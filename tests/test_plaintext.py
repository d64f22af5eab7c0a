"""benchmarks/plaintext.py, the "encryption off" side of the on/off benchmark: its frames carry
the bytes in the clear, and its child processes really run without the cipher."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from benchmarks.common import code_env
from benchmarks.plaintext import ZERO_TAG, install
from benchmarks.runs import socket_cluster
from smolcluster import protocol
from smolcluster.cipher import CIPHERS
from smolcluster.protocol import HEADER, MsgType
from tests.test_protocol import authenticated_pair


@pytest.mark.parametrize("cipher", CIPHERS)
def test_a_null_sealed_frame_is_the_plaintext_and_a_zero_tag(
    monkeypatch: pytest.MonkeyPatch, cipher: str
) -> None:
    """Whichever cipher the server names, install() has swapped it for the null AEAD."""
    monkeypatch.setattr(protocol, "AEADS", dict(protocol.AEADS))
    install()
    client, server = authenticated_pair(cipher=cipher)
    assert client.cipher == server.cipher == cipher
    floats = struct.pack("<4f", 1.5, -2.25, 3.0, 0.125)
    meta = {"step": 7}
    client.send(MsgType.GRADS, meta, floats)
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    wire = HEADER.size + len(meta_bytes) + len(ZERO_TAG) + len(floats) + len(ZERO_TAG)
    raw = bytearray(wire)
    server._recv_exact(memoryview(raw), time.monotonic() + 5)
    assert raw[HEADER.size :] == meta_bytes + ZERO_TAG + floats + ZERO_TAG
    # and the other way, through the trainer's own receive path
    server.send(MsgType.AVERAGE, {"step": 7}, floats)
    assert bytes(client.recv().payload) == floats


@pytest.mark.slow
def test_a_plaintext_server_takes_plaintext_workers_only(
    tmp_path: Path, offline_digits_root: Path
) -> None:
    """Started through benchmarks.plaintext, the server seals its WELCOME with the null AEAD:
    a plaintext worker opens it and trains, a real one finds the tag bad on every attempt and
    gives up (with no swap both would train; with the server's alone, neither)."""
    cluster = socket_cluster(
        tmp_path, 2, offline_digits_root, steps=5, env=code_env(), module="benchmarks.plaintext"
    )
    cluster.spawn("mini1", "server")
    cluster.spawn("mini3", "worker", "--host", "mini3")
    configs = ["--cluster-config", str(cluster.cluster_file), "--nn-config", str(cluster.nn_file)]
    real = [sys.executable, "-m", "smolcluster", "worker", *configs, "--host", "mini2"]
    cluster.start_process("mini2", real)
    # mini2 retries connect_retries times, 0.2 s apart, then exits 1: ~12 s after the run ends.
    codes = cluster.wait(120)
    assert codes == {"mini1": 0, "mini3": 0, "mini2": 1}, cluster.logs()
    assert cluster.summary("mini3")["steps"] == 5
    assert cluster.summary("mini2")["steps"] == 0
    # It got past the secret's handshake (the server admitted it), then failed on the first
    # sealed frame it had to open.
    assert "mini2(rank 1) joined" in cluster.log("mini1"), cluster.logs()
    assert "connected to" not in cluster.log("mini2"), cluster.logs()
