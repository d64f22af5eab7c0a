"""The server's front door: accepts TCP connections and authenticates them, within limits.

A flood cannot take what the workers need: at most `max_handshakes` connections (and
`max_handshakes_per_address` from one address) are being authenticated at once and the rest are
closed as they arrive; each handshake ends within its deadline; running out of file descriptors
pauses accepting instead of ending it. What an authenticated connection does next is the
caller's: `serve(conn, hello, where)` runs in the connection's own thread, and whatever goes
wrong there ends that one connection with one log line, never the process.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from smolcluster.cipher import CHACHA
from smolcluster.protocol import Connection, Deadlines, ProtocolError, server_handshake

log = logging.getLogger("smolcluster")

# accept() failing with these is the machine or the peer, not the listener: wait, go on.
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}
_BACKOFF_S = (0.05, 1.0)


def raise_file_limit(wanted: int = 65536) -> None:
    """Lift the soft limit on open files towards the hard one (macOS starts at 256)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft >= ceiling:
        return
    for target in (ceiling, min(ceiling, 10240)):  # macOS refuses more than OPEN_MAX
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open file limit raised from %d to %d", soft, target)
            return
        except (ValueError, OSError):
            continue


class Listener:
    def __init__(
        self,
        sock: socket.socket,
        secret: bytes,
        max_frame: int,
        deadlines: Deadlines,
        max_handshakes: int,
        max_per_address: int,
        serve: Callable[[Connection, dict[str, Any], str], None],
        cipher: str = CHACHA,
    ) -> None:
        self.sock, self.secret, self.max_frame, self.deadlines = sock, secret, max_frame, deadlines
        self.cipher = cipher  # the cluster's, named to every client in its handshake
        self.max_handshakes, self.max_per_address = max_handshakes, max_per_address
        self.serve = serve
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._handshaking: Counter[str] = Counter()  # source address -> handshakes under way
        self._full = False  # logged that new connections are being turned away

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="accept", daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()

    def _accept_loop(self) -> None:
        backoff = 0.0
        while not self.stopping.is_set():
            try:
                sock, address = self.sock.accept()
            except OSError as exc:
                if self.stopping.is_set() or exc.errno not in _TRANSIENT:
                    return  # the listening socket was closed
                if exc.errno == errno.ECONNABORTED:
                    continue  # that client gave up before we took it
                if not backoff:
                    log.warning("cannot accept connections (%s); retrying", exc.strerror)
                backoff = min(max(backoff * 2, _BACKOFF_S[0]), _BACKOFF_S[1])
                time.sleep(backoff)
                continue
            if backoff:
                log.info("accepting connections again")
                backoff = 0.0
            self._admit(sock, address)

    def _admit(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Start the handshake of a new connection, or close it if the caps are reached."""
        source = address[0]
        with self._lock:
            total = sum(self._handshaking.values())
            full = total >= self.max_handshakes or (
                self._handshaking[source] >= self.max_per_address
            )
            if not full:
                self._handshaking[source] += 1
                self._full = False
            elif not self._full:
                self._full = True
                log.warning(
                    "%d connections (%d from %s) are authenticating; closing new ones until "
                    "some finish",
                    total,
                    self._handshaking[source],
                    source,
                )
        if full:
            sock.close()
            return
        try:
            threading.Thread(
                target=self._connection,
                args=(sock, address),
                name=f"peer-{address[0]}:{address[1]}",
                daemon=True,
            ).start()
        except RuntimeError:  # no more threads: as good as no more file descriptors
            self._release(source)
            sock.close()

    def _release(self, source: str) -> None:
        with self._lock:
            self._handshaking[source] -= 1
            if not self._handshaking[source]:
                del self._handshaking[source]

    def _connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        where = f"{address[0]}:{address[1]}"
        try:
            try:
                conn, hello = server_handshake(
                    sock, self.secret, self.max_frame, where, self.deadlines, self.cipher
                )
            finally:
                self._release(address[0])
            self.serve(conn, hello, where)
        except ProtocolError as exc:
            log.warning("refused connection from %s: %s", where, exc)
        except Exception as exc:  # bytes we did not foresee end this connection, nothing else
            log.warning("closed connection from %s: %s: %s", where, type(exc).__name__, exc)
        finally:
            sock.close()
