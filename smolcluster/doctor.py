"""doctor.yml's last rung: a real authenticated handshake along one trainer path.

The server side runs the trainer's own Listener with the cluster secret for a few seconds; each
worker dials the address and port its job would dial, with the secret its job would read, and
goes through the protocol's real client handshake. So a wrong secret shows as a wrong secret,
a dropped or refused port with its errno (smolcluster.reach's causes), and each side prints one
line naming the host.

    smolcluster doctor listen --host mini1 --bind 0.0.0.0:65432 --secret S --expect mini2,pi4
    smolcluster doctor dial --host mini2 --server 10.10.0.1:65432 --secret S
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from smolcluster.listener import Listener
from smolcluster.protocol import (
    Connection,
    Deadlines,
    MsgType,
    PeerClosed,
    ProtocolError,
    Refused,
    WrongSecret,
    client_handshake,
    read_secret,
)
from smolcluster.reach import EXIT_UNREACHABLE, Unreachable, connect, split_address

EXIT_SECRET = 2  # no usable secret on this host
EXIT_HANDSHAKE = 5  # connected, but the handshake failed
ROLE = "doctor"  # the hello's role: the listener answers it and nothing else
MAX_FRAME = 64 * 1024  # doctor frames are handshakes only


class Failed(Exception):
    """One line naming the host, what failed and the fix."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(line)
        self.code = code


def _secret(host: str, path: Path) -> bytes:
    try:
        return read_secret(path)
    except ProtocolError as exc:
        raise Failed(
            f"smolcluster doctor: {host}: {exc}; fix: run site.yml (it copies the controller's "
            "secret to every host)",
            EXIT_SECRET,
        ) from None


def dial(host: str, server: tuple[str, int], secret_path: Path, wait_s: float) -> str:
    """Handshake with the doctor listener at server as `host`; the ok line, or Failed."""
    secret = _secret(host, secret_path)
    shown = f"{server[0]}:{server[1]}"
    try:
        sock = connect(host, server, wait_s=wait_s)
    except Unreachable as exc:
        raise Failed(str(exc), EXIT_UNREACHABLE) from None
    try:
        conn, _ = client_handshake(
            sock, secret, {"host": host, "role": ROLE}, MAX_FRAME, shown, Deadlines(handshake=5.0)
        )
        conn.close()
    except WrongSecret:
        raise Failed(
            f"smolcluster doctor: {host} reached {shown} but the handshake failed: this host's "
            "cluster secret differs from the server's; fix: run site.yml (one secret from the "
            "controller for every host)",
            EXIT_HANDSHAKE,
        ) from None
    except Refused as exc:
        raise Failed(f"smolcluster doctor: {host}: {shown} {exc}", EXIT_HANDSHAKE) from None
    except PeerClosed as exc:
        raise Failed(
            f"smolcluster doctor: {host} reached {shown} but got no handshake answer ({exc}): "
            "something other than the doctor's listener holds that port (a previous run? run "
            "teardown.yml)",
            EXIT_HANDSHAKE,
        ) from None
    except ProtocolError as exc:
        raise Failed(
            f"smolcluster doctor: {host}: the handshake with {shown} failed: {exc}", EXIT_HANDSHAKE
        ) from None
    finally:
        sock.close()
    return f"smolcluster doctor: {host} -> {shown}: authenticated handshake ok"


class Doorman:
    """The listener's side: admit doctor handshakes, remember who came."""

    def __init__(self, expect: set[str]) -> None:
        self.expect = expect
        self.seen: dict[str, str] = {}
        self.done = threading.Event()
        self._lock = threading.Lock()

    def serve(self, conn: Connection, hello: dict[str, Any], where: str) -> None:
        if hello.get("role") != ROLE:
            conn.send(MsgType.REJECT, {"reason": "this is smolcluster doctor, not a training run"})
            return
        conn.send(MsgType.WELCOME, {"role": ROLE})
        with self._lock:
            self.seen[str(hello.get("host"))] = where
            if self.expect <= set(self.seen):
                self.done.set()


def listen(
    host: str, bind: tuple[str, int], secret_path: Path, expect: set[str], wait_s: float
) -> list[str]:
    """Run the trainer's Listener until every expected host handshook or wait_s passed."""
    secret = _secret(host, secret_path)
    try:
        # As Server.listen binds: a port still held by a run fails here, as it would there.
        sock = socket.create_server(bind, reuse_port=False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError as exc:
        raise Failed(
            str(Unreachable(host, "listen on", f"{bind[0]}:{bind[1]}", exc)), EXIT_UNREACHABLE
        ) from None
    doorman = Doorman(expect)
    listener = Listener(sock, secret, MAX_FRAME, Deadlines(handshake=5.0), 64, 8, doorman.serve)
    listener.start()
    print(f"smolcluster doctor: {host} listening on {bind[0]}:{bind[1]}", flush=True)
    try:
        if expect:
            doorman.done.wait(wait_s)
    finally:
        listener.close()
    lines = [
        f"smolcluster doctor: {host}: handshake from {h} ({w})" for h, w in doorman.seen.items()
    ]
    missing = sorted(expect - set(doorman.seen))
    if missing:
        lines.append(f"smolcluster doctor: {host}: no handshake from {', '.join(missing)}")
    return lines


def add_doctor_parser(sub: Any) -> None:
    doctor = sub.add_parser("doctor", help="doctor.yml's handshake check (listen / dial)")
    doctor_sub = doctor.add_subparsers(dest="doctor_command", required=True)
    lis = doctor_sub.add_parser("listen", help="server: answer doctor handshakes for a while")
    lis.add_argument("--host", required=True, help="this host's inventory name")
    lis.add_argument("--bind", type=split_address, required=True, help="ADDRESS:PORT")
    lis.add_argument("--secret", type=Path, required=True, help="the cluster secret file")
    lis.add_argument("--expect", default="", help="comma-separated hosts that will dial")
    lis.add_argument("--wait-s", type=float, default=15.0, help="stop after this long")
    lis.set_defaults(run=_run_listen)
    dia = doctor_sub.add_parser("dial", help="worker: handshake with the server's listener")
    dia.add_argument("--host", required=True, help="this host's inventory name")
    dia.add_argument("--server", type=split_address, required=True, help="ADDRESS:PORT")
    dia.add_argument("--secret", type=Path, required=True, help="the cluster secret file")
    dia.add_argument("--wait-s", type=float, default=5.0, help="retry connecting this long")
    dia.set_defaults(run=_run_dial)


def _report(run: Any) -> int:
    try:
        for line in run():
            print(line, flush=True)
    except Failed as exc:
        print(exc, file=sys.stderr, flush=True)
        return exc.code
    return 0


def _run_listen(args: argparse.Namespace) -> int:
    # The listener logs each refused handshake (a wrong secret among them) as a warning.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    expect = {h for h in args.expect.split(",") if h}
    return _report(lambda: listen(args.host, args.bind, args.secret, expect, args.wait_s))


def _run_dial(args: argparse.Namespace) -> int:
    return _report(lambda: [dial(args.host, args.server, args.secret, args.wait_s)])
