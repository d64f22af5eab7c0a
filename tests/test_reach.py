"""The job's reachability probe, for real on loopback: refused, listening, in use, late server."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import threading
import time

import pytest

from smolcluster import reach


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smolcluster.reach", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_refused_port_fails_in_one_line_naming_host_address_errno_and_cause() -> None:
    port = _closed_port()
    result = _run("--host", "mini2", "--connect", f"127.0.0.1:{port}", "--wait-s", "0.5")
    assert result.returncode == reach.EXIT_UNREACHABLE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert f"mini2 cannot connect to 127.0.0.1:{port}" in line
    assert f"[Errno {errno.ECONNREFUSED}] ECONNREFUSED" in line
    assert "Application Firewall" in line and "not listening" in line


def test_listening_server_passes() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = _run("--host", "mini2", "--connect", f"127.0.0.1:{port}", "--wait-s", "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_worker_waits_for_a_server_that_starts_late() -> None:
    port = _closed_port()
    ready = threading.Event()

    def serve_later() -> None:
        time.sleep(0.8)
        with socket.create_server(("127.0.0.1", port)) as server:
            ready.set()
            server.settimeout(5)
            conn, _ = server.accept()
            conn.close()

    thread = threading.Thread(target=serve_later)
    thread.start()
    reach.check_connect("mini2", ("127.0.0.1", port), wait_s=8)
    thread.join()
    assert ready.is_set()


def test_server_probe_listens_and_accepts_then_frees_the_port() -> None:
    port = _closed_port()
    assert _run("--host", "mini1", "--listen", f"0.0.0.0:{port}").returncode == 0
    with socket.create_server(("0.0.0.0", port)):  # the trainer can take the port afterwards
        pass


def test_server_probe_names_a_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        result = _run("--host", "mini1", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == reach.EXIT_UNREACHABLE
    assert f"mini1 cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "EADDRINUSE" in result.stderr and "teardown.yml" in result.stderr


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (errno.EHOSTUNREACH, "Local Network privacy"),
        (errno.ENETUNREACH, "route is missing"),
        (errno.ETIMEDOUT, "stealth mode"),
    ],
)
def test_causes_of_errors_loopback_cannot_produce(code: int, cause: str) -> None:
    line = str(reach.Unreachable("mini3", "connect to", "10.10.0.1:65432", OSError(code, "x")))
    assert line.startswith("smolcluster reach: mini3 cannot connect to 10.10.0.1:65432: ")
    assert errno.errorcode[code] in line and cause in line


def test_bad_address_is_a_usage_error() -> None:
    result = _run("--host", "mini2", "--connect", "10.10.0.1")
    assert result.returncode == 2
    assert "expected ADDRESS:PORT" in result.stderr
