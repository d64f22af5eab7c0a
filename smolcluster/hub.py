"""The server's connections and membership: who is connected, who trains, who left.

Threads: one accepts connections, one per connection authenticates and then reads frames into
the event queue (smolcluster.listener). Only the main thread changes membership or sends, and
every send and read has a deadline (smolcluster.protocol), so a broken peer can only ever close
its own connection. The training loops (smolcluster.sync, smolcluster.elastic) see the run
through this hub: `next_event`, `handle_membership`, `activate`, `send_to`, `drop`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smolcluster.cipher import server_cipher
from smolcluster.config import ClusterConfig
from smolcluster.listener import Listener, raise_file_limit
from smolcluster.protocol import (
    Broadcast,
    Connection,
    Deadlines,
    Frame,
    MsgType,
    PeerClosed,
    ProtocolError,
    Sealed,
)

log = logging.getLogger("smolcluster")


@dataclass(eq=False)
class Peer:
    conn: Connection
    host: str
    rank: int
    joined_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    left_at: float | None = None  # when the server dropped it
    samples: int = 0
    steps: int = 0
    compute_s: float | None = None  # forward/backward time of its last step, as it reported

    @property
    def name(self) -> str:
        return f"{self.host}(rank {self.rank})"


# Events the reader threads hand to the main thread.
@dataclass
class Joined:
    peer: Peer


@dataclass
class Received:
    peer: Peer
    frame: Frame


@dataclass
class Gone:
    peer: Peer
    reason: str


Event = Joined | Received | Gone


class Terminated(Exception):
    """SIGTERM arrived; the run stops at a step boundary after a checkpoint."""


def deadlines(cfg: ClusterConfig) -> Deadlines:
    return Deadlines(cfg.handshake_timeout_s, cfg.frame_timeout_s, cfg.send_timeout_s)


class Hub:
    """Admits authenticated workers of this cluster and keeps them in three lists: `pending`
    (joined, not yet started), `active` (training) and `history` (every peer that ever
    trained, for the summary)."""

    def __init__(self, cfg: ClusterConfig, secret: bytes) -> None:
        self.cfg, self.secret = cfg, secret
        self.events: queue.Queue[Event] = queue.Queue()
        self.active: list[Peer] = []
        self.pending: list[Peer] = []
        self.history: list[Peer] = []
        self.hosts_connected: set[str] = set()
        self.lock = threading.Lock()
        self.terminate = threading.Event()  # SIGTERM/SIGINT: checkpoint and exit
        self.listener: Listener | None = None
        self.payload_limits: dict[MsgType, int] = {}  # what a worker's frames may carry
        # One cipher for the whole cluster: the average is sealed once for every worker.
        self.cipher = server_cipher(cfg.cipher)
        self.broadcast = Broadcast(self.cipher)  # seals a step's average once for every worker
        # Told of every joined/started/left (the server writes them as member records).
        self.on_change: Callable[[str, Peer, str | None], None] = lambda *_: None

    # -- connections ---------------------------------------------------------------------------
    def listen(self) -> None:
        raise_file_limit()
        sock = socket.create_server((self.cfg.bind_address, self.cfg.port), reuse_port=False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener = Listener(
            sock,
            self.secret,
            self.cfg.max_frame_bytes,
            deadlines(self.cfg),
            self.cfg.max_handshakes,
            self.cfg.max_handshakes_per_address,
            self._serve_connection,
            self.cipher,
        )
        self.listener.start()
        log.info(
            "listening on %s:%d, sealing with %s", self.cfg.bind_address, self.cfg.port, self.cipher
        )

    def close(self) -> None:
        """Stop accepting; the connections stay until await_goodbyes."""
        if self.listener is not None:
            self.listener.close()

    def _serve_connection(self, conn: Connection, hello: dict[str, Any], where: str) -> None:
        """An authenticated connection: admit it, then hand its frames to the main thread."""
        peer = self._admit(conn, hello)
        conn.limit_payloads(self.payload_limits)
        self.events.put(Joined(peer))
        reason = "left"
        try:
            while True:
                frame = conn.recv()
                peer.last_seen = time.monotonic()
                if frame.type == MsgType.HEARTBEAT:
                    continue
                self.events.put(Received(peer, frame))
                if frame.type in (MsgType.BYE, MsgType.ERROR):
                    reason = str(frame.meta.get("reason", "said goodbye"))
                    break
        except ProtocolError as exc:
            reason = str(exc)
        except Exception as exc:  # bytes we did not foresee end this connection, nothing else
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            with self.lock:
                self.hosts_connected.discard(peer.host)
            self.events.put(Gone(peer, reason))

    def _admit(self, conn: Connection, hello: dict[str, Any]) -> Peer:
        host, rank = hello.get("host"), hello.get("rank")
        reason, retry = None, False
        if host not in self.cfg.workers:
            reason = f"host {host!r} is not in this cluster's workers"
        elif rank != self.cfg.rank_of(host):
            reason = f"{host} has rank {self.cfg.rank_of(host)}, not {rank!r}"
        elif hello.get("mode") != self.cfg.mode:
            reason = f"server runs mode {self.cfg.mode}, worker asked for {hello.get('mode')!r}"
        else:
            with self.lock:
                if host in self.hosts_connected:
                    # Its old connection died on its side first; ours ends at a deadline.
                    reason, retry = f"{host} is already connected", True
                else:
                    self.hosts_connected.add(host)
        if reason:
            conn.send(MsgType.REJECT, {"reason": reason, "retry": retry})
            conn.close()
            raise ProtocolError(reason)
        # The broadcast key travels sealed under this connection's key, as every session frame.
        welcome = {"server": self.cfg.server, "mode": self.cfg.mode}
        conn.send(MsgType.WELCOME, {**welcome, "broadcast_key": self.broadcast.key.hex()})
        return Peer(conn, host, rank)

    def drop(self, peer: Peer, reason: str, error: bool = False) -> None:
        if peer.left_at is None:
            peer.left_at = time.monotonic()
        for group in (self.active, self.pending):
            if peer in group:
                group.remove(peer)
                (log.error if error else log.warning)("dropped %s: %s", peer.name, reason)
                self.on_change("left", peer, reason)
        if error:
            with contextlib.suppress(PeerClosed):
                peer.conn.send(MsgType.ERROR, {"reason": reason})
        peer.conn.close()

    def send_to(
        self,
        peer: Peer,
        mtype: MsgType,
        meta: dict[str, Any],
        payload: Any = b"",
        flags: int = 0,
        sealed: Sealed | None = None,
    ) -> bool:
        try:
            peer.conn.send(mtype, meta, payload, flags, sealed)
            return True
        except PeerClosed as exc:
            self.drop(peer, f"send failed: {exc}")
            return False

    def activate(self, peer: Peer, meta: dict[str, Any], payload: Any) -> bool:
        """Send a pending peer its START; if that went out, it trains from now on."""
        if not self.send_to(peer, MsgType.START, meta, payload):
            return False
        self.pending.remove(peer)
        self.active.append(peer)
        self.history.append(peer)
        self.on_change("started", peer, None)
        return True

    # -- membership ----------------------------------------------------------------------------
    def next_event(self, timeout: float) -> Event | None:
        """The next event within `timeout` s (None if none came); raises Terminated as soon as
        SIGTERM or SIGINT arrive, so no wait outlasts them."""
        deadline = time.monotonic() + timeout
        while not self.terminate.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                return self.events.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
        raise Terminated

    def handle_membership(self, event: Event) -> None:
        """A joiner waits in `pending`; a peer whose connection ended is dropped."""
        if isinstance(event, Joined):
            log.info("%s joined", event.peer.name)
            self.pending.append(event.peer)
            self.on_change("joined", event.peer, None)
        elif isinstance(event, Gone) and (event.peer in self.active or event.peer in self.pending):
            self.drop(event.peer, event.reason)

    def wait_for_workers(self, wanted: int) -> None:
        """Until `wanted` workers joined or join_timeout_s passed; min_workers must be there."""
        deadline = time.monotonic() + self.cfg.join_timeout_s
        while len(self.pending) < wanted:
            event = self.next_event(deadline - time.monotonic())
            if event is None:
                break
            self.handle_membership(event)
        if len(self.pending) < self.cfg.min_workers:
            raise RuntimeError(
                f"only {len(self.pending)} of {self.cfg.num_workers} workers "
                f"joined within {self.cfg.join_timeout_s:.0f} s"
            )
        log.info(
            "starting with %d workers: %s",
            len(self.pending),
            ", ".join(p.name for p in self.pending),
        )

    def wait_for_rejoin(self) -> None:
        log.warning(
            "no workers left; waiting up to %.0f s for one to join", self.cfg.join_timeout_s
        )
        event = self.next_event(self.cfg.join_timeout_s)
        if event is None:
            raise RuntimeError("every worker is gone and none came back")
        self.handle_membership(event)

    def await_goodbyes(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        remaining = set(self.active) | set(self.pending)
        while remaining and time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if (
                isinstance(event, Gone | Received)
                and event.peer in remaining
                and (isinstance(event, Gone) or event.frame.type == MsgType.BYE)
            ):
                remaining.discard(event.peer)
        for peer in list(self.active) + list(self.pending):
            peer.conn.close()

    # -- counters ------------------------------------------------------------------------------
    @property
    def bytes_sent(self) -> int:
        return sum(p.conn.bytes_sent for p in self.history)

    @property
    def bytes_recv(self) -> int:
        return sum(p.conn.bytes_recv for p in self.history)

    def per_host(self) -> dict[str, dict[str, float]]:
        """What each worker host did, summed over its connections (rejoins included)."""
        hosts: dict[str, dict[str, float]] = {}
        for peer in self.history:
            row = hosts.setdefault(
                peer.host,
                {
                    "steps": 0,
                    "samples": 0,
                    "connections": 0,
                    "bytes_sent": 0,
                    "bytes_recv": 0,
                    "seconds": 0.0,
                },
            )
            row["steps"] += peer.steps
            row["samples"] += peer.samples
            row["connections"] += 1
            row["bytes_sent"] += peer.conn.bytes_recv  # what the worker sent us
            row["bytes_recv"] += peer.conn.bytes_sent
            left = peer.left_at if peer.left_at is not None else time.monotonic()
            row["seconds"] += left - peer.joined_at
        for row in hosts.values():
            row["samples_per_s"] = round(row["samples"] / row.pop("seconds"), 2)
        return hosts
