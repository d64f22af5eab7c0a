"""The wire protocol: length-prefixed, encrypted and authenticated frames carrying one flat
tensor buffer.

Handshake frame = header (28 bytes) | metadata (JSON) | HMAC-SHA256 tag (32 bytes), under keys
from the cluster secret. Session frame (everything after the handshake) = header | metadata
sealed (+16) | payload sealed (+16) with the cluster's AEAD (AES-256-GCM or ChaCha20-Poly1305,
named by the server in its CHALLENGE), under per-connection, per-direction keys derived (HKDF)
from the secret and the handshake transcript, with the frame's sequence number in the nonce:
frames can be neither read, forged, replayed, reordered nor moved to another connection. The
one payload every worker receives alike (a step's average) is sealed once under the run's
broadcast key (`Broadcast`), with the step in the nonce, and sent N times.
Nothing on this path is ever unpickled.
Every phase of a connection has a deadline (Deadlines) and every frame a size limit checked on
its header, tighter before authentication than after. docs/protocol.md has the layout and the
limits.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from smolcluster.cipher import AES, AUTO, CHACHA, CIPHERS

MAGIC = b"SMCL"
# 4: the server names the cipher in CHALLENGE; 3: session frames sealed (ChaCha20-Poly1305);
# 2: HMAC over SHA-256(payload)
VERSION = 4
HEADER = struct.Struct("!4sBBHQIQ")  # magic, version, type, flags, seq, meta_len, payload_len
TAG_LEN = 32  # a handshake frame's HMAC-SHA256
SEAL_TAG = 16  # GCM's or Poly1305's, after each sealed part of a session frame
KEY_LEN = 32
# The cluster cipher's name -> its AEAD class, looked up at each construction (a benchmark
# swaps the classes for a null one). Both take 32-byte keys and 12-byte nonces.
AEADS: dict[str, Any] = {AES: AESGCM, CHACHA: ChaCha20Poly1305}
AEAD = AESGCM | ChaCha20Poly1305
# The 12-byte nonce of a sealed part: what it is (4 bytes), then a counter (8): the frame's
# sequence number on a connection, the step under the broadcast key. No two parts sealed
# under one key share a nonce.
NONCE = struct.Struct("!4sQ")
META_PART, PAYLOAD_PART, BROADCAST_PART = b"meta", b"data", b"bcst"
BROADCAST_AAD = struct.Struct("!4sBBH")  # magic, version, type, flags of a broadcast payload
MAX_META = 64 * 1024
# Before authentication a frame is a handshake frame: small metadata, no payload, whatever
# max_frame_bytes says; nobody without the secret makes the receiver allocate more.
HANDSHAKE_META = 4096
NONCE_LEN = 32
SOCKET_BUFFER = 4 * 1024 * 1024


class MsgType(IntEnum):
    HELLO = 1  # client -> server: who I am, client nonce
    CHALLENGE = 2  # server -> client: server nonce
    AUTH = 3  # client -> server: proof of the secret over both nonces
    WELCOME = 4  # server -> client: admitted (session keys from here on)
    REJECT = 5  # server -> client: not admitted, with a reason
    START = 10  # server -> worker: weights (+ optimizer state) and the run plan
    GRADS = 11  # worker -> server: gradients of one sync step
    AVERAGE = 12  # server -> worker: averaged gradients of one sync step
    PUSH = 13  # worker -> server: elastic pseudo-gradient
    WEIGHTS = 14  # server -> worker: elastic global weights
    HEARTBEAT = 15  # either way: still alive
    DONE = 16  # server -> worker: training finished
    BYE = 17  # worker -> server: leaving cleanly
    ERROR = 18  # either way: fatal problem, connection closes


FLAG_INT8 = 1  # payload is smolcluster.quantize int8 blocks, not raw float32
FLAG_BROADCAST = 2  # payload sealed under the run's broadcast key with the metadata's step


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be closed."""


class PeerClosed(ProtocolError):
    """The peer closed the connection (cleanly or not) between or inside frames."""


class PeerTimeout(PeerClosed):
    """A phase of the connection overran its deadline: the peer or the path to it is gone,
    or the peer is too slow on purpose."""


class BadTag(ProtocolError):
    """A frame's tag does not verify: forged, corrupted, or sent under another secret."""


class Refused(ProtocolError):
    """The peer said no (REJECT or ERROR): retrying cannot help."""


class WrongVersion(Refused):
    """The peer speaks another protocol version: one side runs an older smolcluster."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"protocol version {version}, expected {VERSION}: the peer runs "
            f"{'an older' if version < VERSION else 'a newer'} smolcluster; upgrade both sides "
            "to the same release"
        )
        self.version = version


class Busy(ProtocolError):
    """The server still holds this host's previous connection: dial again (not a Refused)."""


class WrongCipher(Refused):
    """The server seals with another cipher than this worker's explicit `cipher` key."""

    def __init__(self, server: str, configured: object) -> None:
        super().__init__(
            f"cipher: the server seals with {server}, this worker is configured for "
            f"{configured}; set the same cipher (or auto) on every host"
        )


class WrongSecret(Refused):
    """The handshake proved that the two sides hold different cluster secrets."""


@dataclass(frozen=True)
class Deadlines:
    """How long each phase of a connection may take, in seconds (None: no limit).

    handshake: the whole handshake, first byte to last; frame: one frame, from its first byte
    to its last; send: writing one frame (a peer that stops reading is gone after this)."""

    handshake: float = 10.0
    frame: float | None = 30.0
    send: float | None = 30.0


@contextlib.contextmanager
def _peer_lost(doing: str) -> Iterator[None]:
    """A socket error while reading or writing means the peer or the path is gone: callers
    handle PeerClosed (PeerTimeout for a timeout) for both directions."""
    try:
        yield
    except TimeoutError:
        raise PeerTimeout(f"timed out {doing}") from None
    except OSError as exc:
        raise PeerClosed(f"connection lost: {exc.strerror or exc}") from None


@dataclass
class Frame:
    type: MsgType
    flags: int
    meta: dict[str, Any]
    payload: memoryview  # valid until the next recv on the same connection


def read_secret(path: Path) -> bytes:
    """The cluster secret: refuse a file others can read, like ssh does with keys."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ProtocolError(f"cannot read cluster secret {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ProtocolError(f"cluster secret {path} is readable by others; chmod 600 it")
    if len(data) < 32:
        raise ProtocolError(f"cluster secret {path} is too short (run `smolcluster secret`)")
    return data


def write_secret(path: Path, force: bool = False) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(os.urandom(32).hex() + "\n")
    os.replace(tmp, path)


def _mac_key(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()


@dataclass(frozen=True)
class Sealed:
    """A payload sealed once under the broadcast key, for `Connection.send(sealed=...)`."""

    mtype: MsgType
    step: int
    flags: int  # FLAG_BROADCAST included
    nbytes: int  # of the plaintext
    data: memoryview  # ciphertext + tag; valid until the next seal


def _broadcast_aad(mtype: MsgType, flags: int) -> bytes:
    return BROADCAST_AAD.pack(MAGIC, VERSION, int(mtype), flags)


class Broadcast:
    """The server's key for the one payload of a step that every worker receives alike: seal
    it once, send it to N workers (each frame's header and metadata stay sealed per connection).
    The key is fresh per server process and goes to each worker inside its sealed WELCOME; a
    step is sealed at most once, so no nonce repeats under the key."""

    def __init__(self, cipher: str = CHACHA) -> None:
        self.key = os.urandom(KEY_LEN)
        self._aead = AEADS[cipher](self.key)
        self._last_step = -1
        self._buffer = bytearray(0)

    def seal(
        self, mtype: MsgType, step: int, payload: bytes | bytearray | memoryview, flags: int = 0
    ) -> Sealed:
        if step <= self._last_step:
            raise ValueError(f"step {step} sealed after step {self._last_step}: nonce reuse")
        self._last_step = step
        body = memoryview(payload).cast("B")
        if len(self._buffer) < body.nbytes + SEAL_TAG:
            self._buffer = bytearray(body.nbytes + SEAL_TAG)
        out = memoryview(self._buffer)[: body.nbytes + SEAL_TAG]
        flags |= FLAG_BROADCAST
        nonce = NONCE.pack(BROADCAST_PART, step)
        self._aead.encrypt_into(nonce, body, _broadcast_aad(mtype, flags), out)
        return Sealed(mtype, step, flags, body.nbytes, out)


class Channel:
    """One TCP socket, non-blocking, where every wait goes through poll() with its own
    deadline, so the two directions time out independently (a reader thread and a sender
    share it), and a deadline bounds a whole phase, not each recv: a peer cannot stretch a
    frame forever by dribbling one byte at a time."""

    def __init__(self, sock: socket.socket, peer: str, deadlines: Deadlines | None) -> None:
        self.sock = sock
        self.peer = peer
        deadlines = deadlines or Deadlines(frame=None, send=None)
        self.frame_timeout = deadlines.frame
        self.send_timeout = deadlines.send
        self.idle_timeout: float | None = None  # waiting for the next frame to begin
        self.deadline: float | None = None  # monotonic time by which the current phase ends
        self.bytes_sent = 0
        self.bytes_recv = 0
        sock.setblocking(False)
        # One poll object per direction: they may wait at the same time in different threads.
        self._readable, self._writable = select.poll(), select.poll()
        self._readable.register(sock.fileno(), select.POLLIN)
        self._writable.register(sock.fileno(), select.POLLOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Room for a whole model in flight, so the server's fan-out of one average to N
        # workers does not wait on each worker's reads in turn.
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)

    def _until(self, timeout: float | None) -> float | None:
        """The deadline of a step that may take `timeout`, within the current phase's."""
        until = None if timeout is None else time.monotonic() + timeout
        if self.deadline is not None:
            until = self.deadline if until is None else min(until, self.deadline)
        return until

    def _wait(self, poller: select.poll, until: float | None, doing: str) -> None:
        timeout_ms = None
        if until is not None:
            left = until - time.monotonic()
            if left <= 0:
                raise PeerTimeout(f"timed out {doing}")
            timeout_ms = math.ceil(left * 1000)
        if not poller.poll(timeout_ms):
            raise PeerTimeout(f"timed out {doing}")

    def _sendmsg(self, parts: list[bytes | memoryview]) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        until = self._until(self.send_timeout)
        with _peer_lost("sending"):
            while views:
                try:
                    sent = self.sock.sendmsg(views)
                except BlockingIOError:
                    self._wait(self._writable, until, "sending (the peer stopped reading)")
                    continue
                self.bytes_sent += sent
                while views and sent >= views[0].nbytes:
                    sent -= views[0].nbytes
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]

    def _recv_exact(
        self, view: memoryview, until: float | None, doing: str = "receiving a frame"
    ) -> None:
        with _peer_lost(doing):
            while view.nbytes:
                try:
                    got = self.sock.recv_into(view)
                except BlockingIOError:
                    self._wait(self._readable, until, doing)
                    continue
                if got == 0:
                    raise PeerClosed("peer closed the connection")
                self.bytes_recv += got
                view = view[got:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Connection(Channel):
    """One authenticated peer. Not thread-safe per direction: one sender, one receiver.

    It starts in the handshake (frames HMAC-tagged under the given keys, every frame's bytes
    hashed into the transcript) and is sealed from `rekey` on (the cluster's AEAD, one key per
    direction)."""

    def __init__(
        self,
        sock: socket.socket,
        send_key: bytes,
        recv_key: bytes,
        max_frame: int,
        peer: str,
        deadlines: Deadlines | None = None,
    ) -> None:
        super().__init__(sock, peer, deadlines)
        self.max_frame = max_frame
        self.meta_limit = MAX_META
        # type -> the largest payload it may carry; None: anything within max_frame.
        self.payload_limits: Mapping[MsgType, int] | None = None
        self._send_key, self._recv_key = send_key, recv_key
        self.cipher = CHACHA  # the cluster's, from rekey on
        self._send_aead: AEAD | None = None  # sealed from rekey on
        self._recv_aead: AEAD | None = None
        self._broadcast: AEAD | None = None  # the server's, on a worker
        self.transcript = hashlib.sha256()  # every handshake frame, both directions
        self._send_seq = 0
        self._recv_seq = 0
        self._header = bytearray(HEADER.size)
        self._tag = bytearray(TAG_LEN)
        self._payload = bytearray(0)  # plaintext payloads land here (or in `into`)
        self._sealed = bytearray(0)  # a sealed payload as received, opened into the above
        self._outgoing = bytearray(0)  # a payload sealed for sending
        self._send_lock = threading.Lock()  # heartbeats come from a second thread

    def rekey(self, send_key: bytes, recv_key: bytes, cipher: str = CHACHA) -> None:
        """From the next frame on, seal every frame with `cipher` under these keys."""
        aead = AEADS[cipher]
        self.cipher, self._send_aead, self._recv_aead = cipher, aead(send_key), aead(recv_key)

    def accept_broadcasts(self, key: bytes) -> None:
        """Open FLAG_BROADCAST payloads with the server's broadcast key (from its WELCOME)."""
        self._broadcast = AEADS[self.cipher](key)

    def limit_payloads(self, limits: Mapping[MsgType, int]) -> None:
        """From now on accept only these types with a payload of at most their size (others:
        none), into one buffer allocated here, once, of the largest."""
        self.payload_limits = dict(limits)
        self._payload = bytearray(max(limits.values(), default=0))

    # -- sending -----------------------------------------------------------------------------
    def send(
        self,
        mtype: MsgType,
        meta: dict[str, Any] | None = None,
        payload: bytes | bytearray | memoryview = b"",
        flags: int = 0,
        sealed: Sealed | None = None,
    ) -> None:
        """Send one frame; `sealed`: a payload sealed once by `Broadcast` instead of `payload`
        (its step must be the metadata's)."""
        meta = meta or {}
        if sealed is not None and (sealed.mtype != mtype or meta.get("step") != sealed.step):
            raise ValueError(
                f"a broadcast {sealed.mtype.name} of step {sealed.step} sent as {mtype.name}"
            )
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        body = memoryview(payload).cast("B")
        with self._send_lock:
            seq = self._send_seq
            nbytes, flags = (sealed.nbytes, sealed.flags) if sealed else (body.nbytes, flags)
            header = HEADER.pack(MAGIC, VERSION, int(mtype), flags, seq, len(meta_bytes), nbytes)
            self._send_seq += 1
            if self._send_aead is None:  # the handshake
                mac = hmac.new(self._send_key, header + meta_bytes, hashlib.sha256)
                mac.update(body)
                parts = [header + meta_bytes, body, mac.digest()]
                for part in parts:
                    self.transcript.update(part)
            else:
                meta_nonce = NONCE.pack(META_PART, seq)
                parts = [header + self._send_aead.encrypt(meta_nonce, meta_bytes, header)]
                if sealed is not None:
                    parts.append(sealed.data)
                elif body.nbytes:
                    parts.append(self._seal_payload(header, seq, body))
            # One gathered write: no small packets with TCP_NODELAY.
            self._sendmsg(parts)

    def _seal_payload(self, header: bytes, seq: int, body: memoryview) -> memoryview:
        """The payload sealed into the connection's outgoing buffer (one pass, no allocation)."""
        assert self._send_aead is not None
        if len(self._outgoing) < body.nbytes + SEAL_TAG:
            self._outgoing = bytearray(body.nbytes + SEAL_TAG)
        out = memoryview(self._outgoing)[: body.nbytes + SEAL_TAG]
        self._send_aead.encrypt_into(NONCE.pack(PAYLOAD_PART, seq), body, header, out)
        return out

    # -- receiving ---------------------------------------------------------------------------
    def recv(self, into: Mapping[MsgType, memoryview] | None = None) -> Frame:
        """Read one frame. A payload whose type is in `into` lands in that buffer, which it
        must fill exactly; any other payload lands in the connection's own reused buffer."""
        header = memoryview(self._header)
        self._recv_exact(header[:1], self._until(self.idle_timeout), "waiting for a frame")
        until = self._until(self.frame_timeout)  # from the first byte to the last
        self._recv_exact(header[1:], until)
        magic, version, mtype, flags, seq, meta_len, payload_len = HEADER.unpack(self._header)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}")
        if version != VERSION:
            raise WrongVersion(version)
        try:
            kind = MsgType(mtype)
        except ValueError:
            raise ProtocolError(f"unknown message type {mtype}") from None
        # Checked on the header, before anything is allocated or read.
        limit = self.max_frame - HEADER.size - TAG_LEN - meta_len
        if self.payload_limits is not None:
            limit = min(limit, self.payload_limits.get(kind, 0))
        if meta_len > self.meta_limit or payload_len > limit:
            raise ProtocolError(
                f"{kind.name} frame of {meta_len} + {payload_len} bytes (metadata + payload) "
                f"exceeds the limit of {self.meta_limit} + {max(limit, 0)}"
            )
        if seq != self._recv_seq:
            raise ProtocolError(f"sequence number {seq}, expected {self._recv_seq}")
        if into is not None and kind in into:
            target = into[kind].cast("B")
            if target.nbytes != payload_len:
                raise ProtocolError(
                    f"{kind.name} payload of {payload_len} bytes, expected {target.nbytes}"
                )
        else:
            if len(self._payload) < payload_len:
                self._payload = bytearray(payload_len)
            target = memoryview(self._payload)[:payload_len]
        if self._recv_aead is None:
            meta_raw = self._recv_handshake_frame(kind, seq, meta_len, target, until)
        else:
            meta_raw = self._recv_sealed_frame(kind, flags, meta_len, target, until)
        self._recv_seq += 1
        meta = _parse_meta(meta_raw)
        if flags & FLAG_BROADCAST:
            self._open_broadcast(kind, flags, meta, target, until)
        return Frame(kind, flags & ~FLAG_BROADCAST, meta, target)

    def _recv_handshake_frame(
        self, kind: MsgType, seq: int, meta_len: int, target: memoryview, until: float | None
    ) -> bytes:
        """Metadata and payload in the clear, then the HMAC over header, metadata, payload."""
        meta_raw = bytearray(meta_len)  # at most meta_limit
        self._recv_exact(memoryview(meta_raw), until)
        self._recv_exact(target, until)
        self._recv_exact(memoryview(self._tag), until)
        mac = hmac.new(self._recv_key, self._header, hashlib.sha256)
        mac.update(meta_raw)
        mac.update(target)
        if not hmac.compare_digest(mac.digest(), self._tag):
            raise BadTag(f"bad HMAC on {kind.name} frame {seq}")
        for part in (self._header, meta_raw, target, self._tag):
            self.transcript.update(part)
        return bytes(meta_raw)

    def _recv_sealed_frame(
        self, kind: MsgType, flags: int, meta_len: int, target: memoryview, until: float | None
    ) -> bytes:
        """Sealed metadata, then (unless it is a broadcast) the sealed payload, opened into
        `target`: one pass over the payload, which fails on any changed, replayed, reordered
        or foreign byte."""
        assert self._recv_aead is not None
        header, seq = bytes(self._header), self._recv_seq  # the nonce is our count, not theirs
        sealed_meta = bytearray(meta_len + SEAL_TAG)
        self._recv_exact(memoryview(sealed_meta), until)
        try:
            meta_raw = self._recv_aead.decrypt(NONCE.pack(META_PART, seq), sealed_meta, header)
        except InvalidTag:
            raise BadTag(f"bad tag on {kind.name} frame {seq}") from None
        if target.nbytes and not flags & FLAG_BROADCAST:
            sealed = self._receive_sealed(target.nbytes, until)
            try:
                self._recv_aead.decrypt_into(NONCE.pack(PAYLOAD_PART, seq), sealed, header, target)
            except InvalidTag:
                raise BadTag(f"bad tag on the payload of {kind.name} frame {seq}") from None
        return meta_raw

    def _receive_sealed(self, nbytes: int, until: float | None) -> memoryview:
        if len(self._sealed) < nbytes + SEAL_TAG:
            self._sealed = bytearray(nbytes + SEAL_TAG)
        sealed = memoryview(self._sealed)[: nbytes + SEAL_TAG]
        self._recv_exact(sealed, until)
        return sealed

    def _open_broadcast(
        self,
        kind: MsgType,
        flags: int,
        meta: dict[str, Any],
        target: memoryview,
        until: float | None,
    ) -> None:
        """A payload the server sealed once for every worker, under its broadcast key with the
        step (from the metadata, which is sealed on this connection) in the nonce."""
        step = meta.get("step")
        if self._broadcast is None or not isinstance(step, int) or step < 0:
            raise ProtocolError(f"broadcast {kind.name} without a broadcast key or a step")
        sealed = self._receive_sealed(target.nbytes, until)
        try:
            self._broadcast.decrypt_into(
                NONCE.pack(BROADCAST_PART, step), sealed, _broadcast_aad(kind, flags), target
            )
        except InvalidTag:
            raise BadTag(f"bad tag on the broadcast payload of {kind.name} step {step}") from None

    def expect(self, *kinds: MsgType, into: Mapping[MsgType, memoryview] | None = None) -> Frame:
        frame = self.recv(into)
        if frame.type == MsgType.ERROR:
            raise Refused(f"peer reported an error: {frame.meta.get('reason', '?')}")
        if frame.type not in kinds:
            names = "/".join(k.name for k in kinds)
            raise ProtocolError(f"unexpected {frame.type.name}, expected {names}")
        return frame


def json_int(value: object) -> bool:
    """A JSON integer in frame metadata, not a bool (True is an int to isinstance)."""
    return isinstance(value, int) and not isinstance(value, bool)


def json_number(value: object) -> bool:
    """A JSON number in frame metadata, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_meta(meta_raw: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(meta_raw) if meta_raw else {}
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, or nested too deep
        raise ProtocolError("metadata is not a JSON object we can read") from None
    if not isinstance(meta, dict):
        raise ProtocolError("metadata is not a JSON object")
    return meta


# -- handshake -------------------------------------------------------------------------------
# Handshake frames are MACed with keys derived from the secret alone; the client then proves it
# knows the secret over both fresh nonces, and both sides switch to per-connection session keys
# derived from the secret and everything the handshake sent (both nonces included).


def _handshake_keys(secret: bytes) -> tuple[bytes, bytes]:
    c2s = _mac_key(secret, b"smolcluster/1 handshake c2s")
    return c2s, _mac_key(secret, b"smolcluster/1 handshake s2c")


def _session_keys(secret: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(client-to-server, server-to-client) keys: HKDF-SHA256 of the secret, salted with the
    SHA-256 of the handshake transcript, so every connection has keys of its own."""
    hkdf = HKDF(hashes.SHA256(), 2 * KEY_LEN, salt=transcript, info=b"smolcluster/4 session")
    keys = hkdf.derive(secret)
    return keys[:KEY_LEN], keys[KEY_LEN:]


def _refuse_old_peer(sock: socket.socket, secret: bytes, version: int) -> None:
    """Answer a version-2 or -3 HELLO with a REJECT that worker verifies and reports (tagged as
    its handshake frames are: version 3 as ours, version 2 over SHA-256 of the empty payload),
    so the old side stops with the reason instead of redialling; other versions are only
    closed."""
    if version not in (2, 3):
        return
    reason = json.dumps({"reason": str(WrongVersion(version))}).encode()
    header = HEADER.pack(MAGIC, version, int(MsgType.REJECT), 0, 0, len(reason), 0)
    mac = hmac.new(_handshake_keys(secret)[1], header + reason, hashlib.sha256)
    if version == 2:
        mac.update(hashlib.sha256(b"").digest())
    with contextlib.suppress(OSError):
        sock.sendall(header + reason + mac.digest())
        sock.shutdown(socket.SHUT_WR)
        sock.recv(HANDSHAKE_META + 64)  # the rest of its HELLO: unread, it would make close reset


def _proof(secret: bytes, nonce_c: bytes, nonce_s: bytes) -> str:
    return hmac.new(secret, b"client proof" + nonce_c + nonce_s, hashlib.sha256).hexdigest()


def _nonce(meta: dict[str, Any], key: str) -> bytes:
    return _key(meta.get(key), key)


def _key(value: Any, name: str) -> bytes:
    """32 bytes from 64 hex characters (a nonce or a key), or a ProtocolError naming them."""
    try:
        raw = bytes.fromhex(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"handshake without a valid {name}") from None
    if len(raw) != NONCE_LEN:
        raise ProtocolError(f"handshake {name} has the wrong length")
    return raw


def _handshaking(conn: Connection, timeout: float) -> None:
    """The handshake is one phase: it ends within `timeout` s, its frames are small."""
    conn.deadline = time.monotonic() + timeout
    conn.meta_limit, conn.payload_limits = HANDSHAKE_META, {}


def _session(conn: Connection) -> None:
    conn.deadline, conn.meta_limit, conn.payload_limits = None, MAX_META, None


def client_handshake(
    sock: socket.socket,
    secret: bytes,
    hello: dict[str, Any],
    max_frame: int,
    peer: str,
    deadlines: Deadlines | None = None,
    cipher: str = AUTO,
) -> tuple[Connection, Frame]:
    """Authenticate to the server; return the connection and its WELCOME frame. `cipher`:
    this worker's key, `auto` to seal with whatever the server names.

    WrongSecret when the server's answer does not verify under our secret (it sends REJECT
    under its own when our HELLO fails); Refused when it says no for another reason."""
    deadlines = deadlines or Deadlines()
    c2s, s2c = _handshake_keys(secret)
    conn = Connection(sock, c2s, s2c, max_frame, peer, deadlines)
    _handshaking(conn, deadlines.handshake)
    nonce_c = os.urandom(NONCE_LEN)
    try:
        conn.send(MsgType.HELLO, {**hello, "cipher": cipher, "nonce": nonce_c.hex()})
        first = conn.expect(MsgType.CHALLENGE, MsgType.REJECT)
    except BadTag:
        raise WrongSecret(
            f"the server at {peer} answered under another key: the cluster secret differs "
            "from the server's"
        ) from None
    if first.type == MsgType.REJECT:
        raise Refused(f"server refused us: {first.meta.get('reason', '?')}")
    nonce_s = _nonce(first.meta, "nonce")
    named = first.meta.get("cipher")
    if named not in CIPHERS:
        raise ProtocolError(f"handshake names no cipher we know ({named!r})")
    if cipher not in (AUTO, named):
        raise WrongCipher(named, cipher)
    conn.send(MsgType.AUTH, {"proof": _proof(secret, nonce_c, nonce_s)})
    # The name is in the transcript: a CHALLENGE rewritten on the way gives us other keys
    # than the server's, and WELCOME fails to open.
    conn.rekey(*_session_keys(secret, conn.transcript.digest()), named)
    reply = conn.expect(MsgType.WELCOME, MsgType.REJECT)
    if reply.type == MsgType.REJECT:
        refusal = Busy if reply.meta.get("retry") is True else Refused
        raise refusal(f"server refused us: {reply.meta.get('reason', '?')}")
    if "broadcast_key" in reply.meta:
        conn.accept_broadcasts(_key(reply.meta.pop("broadcast_key"), "broadcast_key"))
    _session(conn)
    return conn, reply


def server_handshake(
    sock: socket.socket,
    secret: bytes,
    max_frame: int,
    peer: str,
    deadlines: Deadlines | None = None,
    cipher: str = CHACHA,
) -> tuple[Connection, dict[str, Any]]:
    """Check a client's proof of the secret; the caller sends WELCOME or REJECT after.
    `cipher`: the cluster's, named in CHALLENGE; a client configured for another is refused.

    A HELLO whose tag fails is answered with REJECT under our key, which the client cannot
    verify either: that is how a worker with the wrong secret learns so at once."""
    deadlines = deadlines or Deadlines()
    c2s, s2c = _handshake_keys(secret)
    conn = Connection(sock, s2c, c2s, max_frame, peer, deadlines)
    _handshaking(conn, deadlines.handshake)
    try:
        hello = conn.expect(MsgType.HELLO).meta
    except BadTag:
        with contextlib.suppress(ProtocolError):
            conn.send(MsgType.REJECT, {"reason": "authentication failed: wrong cluster secret"})
        raise
    except WrongVersion as exc:
        _refuse_old_peer(sock, secret, exc.version)
        raise
    nonce_c = _nonce(hello, "nonce")
    wanted = hello.get("cipher")
    if wanted not in (AUTO, cipher):
        refusal = WrongCipher(cipher, wanted)
        with contextlib.suppress(ProtocolError):
            conn.send(MsgType.REJECT, {"reason": str(refusal)})
        raise refusal
    nonce_s = os.urandom(NONCE_LEN)
    conn.send(MsgType.CHALLENGE, {"nonce": nonce_s.hex(), "cipher": cipher})
    proof = conn.expect(MsgType.AUTH).meta.get("proof")
    if not (isinstance(proof, str) and proof.isascii()) or not hmac.compare_digest(
        proof, _proof(secret, nonce_c, nonce_s)
    ):
        raise ProtocolError("authentication failed (wrong cluster secret?)")
    send_key, recv_key = _session_keys(secret, conn.transcript.digest())[::-1]
    conn.rekey(send_key, recv_key, cipher)
    _session(conn)
    return conn, hello
