"""Reachability probe, run by job.sh in the job's own launch context before the trainer starts.

macOS decides Local Network access per process and launch context (TN3179): the same Python
can reach 10.10.0.1 under sshd and get EHOSTUNREACH under tmux or a LaunchAgent while every
ping passes. Probing from job.sh itself, under the same launcher, turns that into one line
naming the host, the address, the errno and its likely cause, instead of a silent retry loop.

    python -m smolcluster.reach --host mini2 --connect 10.10.0.1:65432 [--wait-s 15]
    python -m smolcluster.reach --host mini1 --listen 0.0.0.0:65432 --self 10.10.0.1
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
import time

EXIT_UNREACHABLE = 4

# errno -> what it most likely means on this cluster (docs/cluster-setup.md, "First run on a Mac").
CAUSES: dict[int, str] = {
    errno.EHOSTUNREACH: (
        "if ping to it works, macOS Local Network privacy blocked this process "
        "(use the launchd backend, or run the job as root); else no link to that host"
    ),
    errno.ECONNREFUSED: (
        "nothing accepts on that port: the server is not listening yet, or a firewall "
        "(macOS Application Firewall) rejected the connection"
    ),
    errno.ENETUNREACH: "no route to that network: a cluster route is missing (run site.yml)",
    errno.ETIMEDOUT: (
        "packets dropped: a firewall in stealth mode, or the address is wrong or down"
    ),
    errno.EADDRINUSE: "the port is in use: a previous run still holds it (run teardown.yml)",
    errno.EADDRNOTAVAIL: "the address is not on this host (check smolcluster_bind_address)",
    errno.EACCES: "the operating system refused the socket (privileged port or sandbox)",
}


class Unreachable(Exception):
    def __init__(self, host: str, action: str, address: str, err: OSError) -> None:
        code = err.errno if err.errno is not None else errno.ETIMEDOUT
        name = errno.errorcode.get(code, str(code))
        cause = CAUSES.get(code, "unexpected error")
        reason = err.strerror or str(err) or "timed out"
        super().__init__(
            f"smolcluster reach: {host} cannot {action} {address}: "
            f"[Errno {code}] {name} ({reason}); likely cause: {cause}"
        )
        self.errno = code


def split_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected ADDRESS:PORT, got {text!r}")
    return host, int(port)


def check_connect(
    host: str, address: tuple[str, int], wait_s: float = 15.0, timeout_s: float = 3.0
) -> None:
    """Open (and close) one TCP connection; retry until wait_s while the server starts."""
    connect(host, address, wait_s, timeout_s).close()


def connect(
    host: str, address: tuple[str, int], wait_s: float = 15.0, timeout_s: float = 3.0
) -> socket.socket:
    """A TCP connection to address, retried until wait_s; Unreachable names the errno."""
    deadline = time.monotonic() + wait_s
    shown = f"{address[0]}:{address[1]}"
    while True:
        try:
            return socket.create_connection(address, timeout=timeout_s)
        except TimeoutError as exc:
            last: OSError = OSError(errno.ETIMEDOUT, "timed out")
            last.__cause__ = exc
        except OSError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise Unreachable(host, "connect to", shown, last)
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def check_listen(host: str, bind: tuple[str, int], self_address: str | None = None) -> None:
    """Bind and listen on the server's port, then accept one connection from ourselves."""
    shown = f"{bind[0]}:{bind[1]}"
    try:
        server = socket.create_server(bind)
    except OSError as exc:
        raise Unreachable(host, "listen on", shown, exc) from exc
    with server:
        # SO_REUSEADDR is not set on purpose: a port still held fails here, as it would later.
        target = self_address or ("127.0.0.1" if bind[0] in ("0.0.0.0", "") else bind[0])
        server.settimeout(3.0)
        try:
            with socket.create_connection((target, bind[1]), timeout=3.0):
                conn, _ = server.accept()
            conn.close()  # after the client: TIME_WAIT stays on its side, not on the port
        except TimeoutError as exc:
            raise Unreachable(
                host, "accept on", f"{target}:{bind[1]}", OSError(errno.ETIMEDOUT, "timed out")
            ) from exc
        except OSError as exc:
            raise Unreachable(host, "accept on", f"{target}:{bind[1]}", exc) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smolcluster.reach", description=__doc__)
    parser.add_argument("--host", required=True, help="this host's inventory name")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--connect", type=split_address, help="worker: ADDRESS:PORT to dial")
    mode.add_argument("--listen", type=split_address, help="server: ADDRESS:PORT to bind")
    parser.add_argument("--self", dest="self_address", help="server: its own dial address")
    parser.add_argument("--wait-s", type=float, default=15.0, help="worker: retry this long")
    args = parser.parse_args(argv)
    try:
        if args.connect:
            check_connect(args.host, args.connect, wait_s=args.wait_s)
        else:
            check_listen(args.host, args.listen, args.self_address)
    except Unreachable as exc:
        print(exc, file=sys.stderr, flush=True)
        return EXIT_UNREACHABLE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
