"""smolcluster doctor: real handshakes between real sockets on loopback, each failure one line."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from smolcluster import doctor
from smolcluster.harness import free_port
from smolcluster.protocol import write_secret


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    write_secret(path)
    return path


def start_listener(
    port: int, secret: Path, expect: set[str], out: dict, wait_s: float = 10.0
) -> threading.Thread:
    def run() -> None:
        try:
            out["lines"] = doctor.listen("mini1", ("127.0.0.1", port), secret, expect, wait_s)
        except doctor.Failed as exc:
            out["failed"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_dial_and_listen_complete_an_authenticated_handshake(secret: Path) -> None:
    port, out = free_port(), {}
    thread = start_listener(port, secret, {"mini2"}, out)
    line = doctor.dial("mini2", ("127.0.0.1", port), secret, wait_s=5.0)
    thread.join(10)
    assert line == f"smolcluster doctor: mini2 -> 127.0.0.1:{port}: authenticated handshake ok"
    assert out["lines"][0].startswith("smolcluster doctor: mini1: handshake from mini2 (127.0.0.1:")
    assert len(out["lines"]) == 1  # nobody missing: it stopped as soon as mini2 came


def test_a_wrong_secret_is_named_as_such(secret: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-secret"
    write_secret(other)
    port, out = free_port(), {}
    thread = start_listener(port, secret, {"mini2"}, out, wait_s=2.0)  # mini2 never gets in
    with pytest.raises(doctor.Failed) as failed:
        doctor.dial("mini2", ("127.0.0.1", port), other, wait_s=5.0)
    assert failed.value.code == doctor.EXIT_HANDSHAKE
    assert "mini2 reached 127.0.0.1" in str(failed.value)
    assert "cluster secret differs from the server's" in str(failed.value)
    thread.join(15)
    assert out["lines"] == ["smolcluster doctor: mini1: no handshake from mini2"]


def test_a_stopped_port_is_refused_with_its_errno(secret: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(doctor.Failed) as failed:
        doctor.dial("pi4", ("127.0.0.1", port), secret, wait_s=0.5)
    assert failed.value.code == doctor.EXIT_UNREACHABLE
    assert f"pi4 cannot connect to 127.0.0.1:{port}: [Errno 111] ECONNREFUSED" in str(failed.value)
    assert "nothing accepts on that port" in str(failed.value)


def test_something_else_on_the_port_is_not_taken_for_the_server(secret: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]

        def accept_and_close() -> None:
            conn, _ = other.accept()
            conn.close()

        threading.Thread(target=accept_and_close, daemon=True).start()
        with pytest.raises(doctor.Failed) as failed:
            doctor.dial("mini3", ("127.0.0.1", port), secret, wait_s=2.0)
    assert "got no handshake answer" in str(failed.value), failed.value


def test_listen_names_a_port_in_use(secret: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        with pytest.raises(doctor.Failed) as failed:
            doctor.listen("mini1", ("127.0.0.1", port), secret, {"mini2"}, 1.0)
    assert f"mini1 cannot listen on 127.0.0.1:{port}: [Errno 98] EADDRINUSE" in str(failed.value)
    assert "run teardown.yml" in str(failed.value)


def test_the_command_prints_one_line_and_exits_nonzero_without_a_secret(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "smolcluster", "doctor", "dial", "--host", "pi5",
         "--server", f"127.0.0.1:{free_port()}", "--secret", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == doctor.EXIT_SECRET, proc
    assert proc.stderr.strip().splitlines() == [
        f"smolcluster doctor: pi5: cannot read cluster secret {tmp_path / 'missing'}: "
        "No such file or directory; fix: run site.yml (it copies the controller's secret to "
        "every host)"
    ]
