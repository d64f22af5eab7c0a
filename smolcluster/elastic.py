"""Elastic mode: workers train locally at their own pace; the server merges what they learned.

A worker runs its own Adam for K = push_interval local steps, then pushes the pseudo-gradient
delta = (weights it started from) - (weights now) together with the global version it started
from. The server applies each push as it arrives, never waiting for a round:

    g = (1 + s) ** -staleness_exponent * min(1, n / (K * b)) / A * delta
    m <- server_momentum * m + g
    w <- w - server_lr * (g + server_momentum * m)          (Nesterov; momentum 0: plain SGD)

with s = current version - base version (staleness), n the samples behind the push, b the batch
size and A the number of active workers (so a round of A fresh pushes moves w by about their
average, as synchronous model averaging would). Every push answers with the new version and,
when the worker's pull is due (every worker_update_interval steps), the current weights.
docs/algorithms.md explains the choice.
"""

from __future__ import annotations

import logging
import select
import sys
import threading
import time
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from smolcluster import quantize
from smolcluster.metrics import Metrics
from smolcluster.plan import Plan
from smolcluster.protocol import (
    FLAG_INT8,
    Connection,
    Frame,
    MsgType,
    PeerClosed,
    ProtocolError,
)
from smolcluster.replica import Replica

if TYPE_CHECKING:
    from smolcluster.data import ShardLoader
    from smolcluster.server import Peer, Server

log = logging.getLogger("smolcluster")


def push_interval(server_cfg) -> int:
    return server_cfg.push_interval or server_cfg.worker_update_interval


def merge_weight(cfg, staleness: int, samples: int, batch_size: int, active: int) -> float:
    """How much of a pushed delta the outer step takes, before server_lr (module doc)."""
    share = min(1.0, samples / (push_interval(cfg) * batch_size))
    return (1 + staleness) ** -cfg.staleness_exponent * share / max(1, active)


class ElasticLoop:
    """The server side: admit, merge pushes, answer with weights, evict the silent."""

    def __init__(self, server: Server, plan: Plan, replica: Replica, metrics: Metrics) -> None:
        self.server, self.plan, self.replica, self.metrics = server, plan, replica, metrics
        self.cfg = server.cfg
        self.batch_size = server.settings.nn.batch_size
        # The same number of samples a sync run of this plan would process.
        self.budget = plan.total_steps * self.cfg.num_workers * self.batch_size
        self.delta = torch.zeros(replica.numel)
        # The outer optimizer's momentum. The server's own Adam is idle in elastic mode, so the
        # buffer lives in its first-moment slot: checkpoints and --resume carry it for free.
        self.momentum = replica.state_tensors()[1]
        # For int8 replies: the weights each worker holds of ours, so we send exact differences.
        self.mirrors: dict[Peer, torch.Tensor] = {}
        eval_every = max(1, server.settings.nn.eval_steps // push_interval(self.cfg))
        server.evaluator.every = eval_every

    def run(self) -> None:
        server = self.server
        progress = tqdm(
            total=self.budget,
            initial=server.samples_merged,
            desc="samples",
            unit="sample",
            disable=not sys.stderr.isatty(),
        )
        while server.samples_merged < self.budget:
            self._admit()
            self._evict_silent()
            if not server.active and not server.pending:
                server._wait_for_rejoin()
                continue
            event = server.next_event(0.5)
            if event is None:
                continue
            from smolcluster.server import Received

            if not isinstance(event, Received):
                server._handle_membership(event)
                continue
            if event.peer not in server.active:
                continue
            try:
                merged = self._merge(event.peer, event.frame)
            except ProtocolError as exc:
                server.drop(event.peer, str(exc), error=True)
                continue
            progress.update(merged)
            last = server.samples_merged >= self.budget
            server.evaluator.maybe(
                server.step, float(event.frame.meta.get("loss", float("nan"))), final=last
            )
            server.boundary(self.replica)
        progress.close()

    def _admit(self) -> None:
        server = self.server
        for peer in list(server.pending):
            meta = {
                "version": server.step,
                "push_interval": push_interval(self.cfg),
                "numel": self.replica.numel,
                "total_steps": self.plan.total_steps,
                "progress": self.progress,
            }
            if server.send_to(peer, MsgType.START, meta, self.replica.params.numpy()):
                server.pending.remove(peer)
                server.active.append(peer)
                server.history.append(peer)
                peer.last_seen = time.monotonic()  # its heartbeats start with START
                if self.cfg.use_quantization:
                    self.mirrors[peer] = self.replica.params.clone()
                log.info("%s starts at version %d", peer.name, server.step)

    @property
    def progress(self) -> float:
        """How far the run is (samples merged / budget): the workers' lr schedule follows it."""
        return round(min(1.0, self.server.samples_merged / self.budget), 6)

    def _evict_silent(self) -> None:
        now = time.monotonic()
        for peer in list(self.server.active):
            if now - peer.last_seen > self.cfg.heartbeat_timeout_s:
                self.server.drop(peer, f"silent for {now - peer.last_seen:.0f} s")
                self.mirrors.pop(peer, None)

    def _merge(self, peer: Peer, frame: Frame) -> int:
        server, meta = self.server, frame.meta
        if frame.type != MsgType.PUSH:
            raise ProtocolError(f"unexpected {frame.type.name} in elastic mode")
        base, samples = meta.get("base_version"), meta.get("samples")
        if not isinstance(base, int) or not 0 <= base <= server.step:
            raise ProtocolError(f"push from version {base!r}, current is {server.step}")
        if not isinstance(samples, int) or samples <= 0:
            raise ProtocolError("push without a valid sample count")
        steps, loss = meta.get("steps", 0), meta.get("loss", float("nan"))
        if not isinstance(steps, int) or steps < 0 or not isinstance(loss, int | float):
            raise ProtocolError("push without a valid step count and loss")
        _decode_into(frame, self.delta)
        if not torch.isfinite(self.delta.sum()):
            raise ProtocolError("non-finite update")
        staleness = server.step - base
        weight = merge_weight(self.cfg, staleness, samples, self.batch_size, len(server.active))
        self._outer_step(weight)
        server.step += 1
        server.samples_merged += samples
        peer.samples += samples
        peer.steps += steps
        self._reply(peer, bool(meta.get("pull")))
        self.metrics.write(
            "step",
            step=server.step,
            host=peer.host,
            staleness=staleness,
            merge_weight=round(self.cfg.server_lr * weight, 6),
            samples=server.samples_merged,
            loss=meta.get("loss"),
            workers=len(server.active),
            bytes_sent=sum(p.conn.bytes_sent for p in server.history),
            bytes_recv=sum(p.conn.bytes_recv for p in server.history),
        )
        return samples

    def _outer_step(self, weight: float) -> None:
        """w <- w - server_lr * (g + mu * m) with m <- mu * m + g, g = weight * delta.

        Nesterov momentum over pushes, as DiLoCo's outer optimizer; mu = 0 is plain SGD.
        """
        mu, lr = self.cfg.server_momentum, self.cfg.server_lr
        self.delta.mul_(weight)
        if mu:
            self.momentum.mul_(mu).add_(self.delta)
            self.delta.add_(self.momentum, alpha=mu)
        self.replica.params.sub_(self.delta, alpha=lr)

    def _reply(self, peer: Peer, pull: bool) -> None:
        meta = {"version": self.server.step, "weights": pull, "progress": self.progress}
        if not pull:
            self.server.send_to(peer, MsgType.WEIGHTS, meta)
        elif self.cfg.use_quantization:
            mirror = self.mirrors[peer]
            encoded = quantize.encode(self.replica.params - mirror)
            mirror.add_(quantize.decode(encoded, self.replica.numel))
            self.server.send_to(peer, MsgType.WEIGHTS, meta, encoded.numpy(), FLAG_INT8)
        else:
            self.server.send_to(peer, MsgType.WEIGHTS, meta, self.replica.params.numpy())


def _decode_into(frame: Frame, out: torch.Tensor) -> None:
    n = out.numel()
    expected = quantize.encoded_nbytes(n) if frame.flags & FLAG_INT8 else n * 4
    if frame.payload.nbytes != expected:
        raise ProtocolError(
            f"{frame.type.name} payload of {frame.payload.nbytes} bytes, expected {expected}"
        )
    if frame.flags & FLAG_INT8:
        quantize.decode(torch.frombuffer(frame.payload, dtype=torch.uint8), n, out=out)
    else:
        out.copy_(torch.frombuffer(frame.payload, dtype=torch.float32))


def _progress(meta: dict, default: float = 0.0) -> float:
    value = meta.get("progress", default)
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ProtocolError(f"bad progress {value!r}")
    return float(value)


class ElasticSession:
    """The worker side over one connection: local steps, pushes, pulls, heartbeats."""

    def __init__(
        self,
        conn: Connection,
        start: Frame,
        cfg,
        loader: ShardLoader,
        replica: Replica,
        throttle_s: float,
        counters,
    ) -> None:
        self.conn, self.cfg, self.loader, self.replica = conn, cfg, loader, replica
        self.throttle_s, self.counters = throttle_s, counters
        self.k = start.meta["push_interval"]
        self.version = start.meta["version"]
        self.progress = _progress(start.meta)
        _decode_into(start, replica.params)
        self.anchor = replica.params.clone()  # where the current delta is measured from
        self.mirror = replica.params.clone()  # the global weights as we last received them
        self.feedback = quantize.ErrorFeedback(replica.numel) if cfg.use_quantization else None
        self.stop = threading.Event()
        self.heartbeat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self.heartbeat.start()

    def _heartbeat(self) -> None:
        while not self.stop.wait(self.cfg.heartbeat_interval_s):
            try:
                self.conn.send(MsgType.HEARTBEAT)
            except PeerClosed:
                return  # the main loop finds the broken connection on its next send or read

    def run(self, metrics: Metrics) -> bool:
        """Train until the server says DONE (True) or the connection breaks (raises)."""
        try:
            return self._loop(metrics)
        finally:
            # Join, not just signal: a thread still alive at interpreter exit has been seen to
            # abort the process ("terminate called without an active exception").
            self.stop.set()
            self.heartbeat.join(timeout=5)

    def _loop(self, metrics: Metrics) -> bool:
        samples, losses = 0, 0.0
        per_epoch = self.loader.steps_per_epoch
        while True:
            local_step = self.counters.steps
            x, y = self.loader.batch(*divmod(local_step, per_epoch))
            losses += self.replica.compute_gradients(x, y)
            self.replica.step(self.progress)
            self.counters.steps += 1
            self.counters.samples += len(y)
            samples += len(y)
            if self.throttle_s:
                time.sleep(self.throttle_s)
            if self._server_said_done():
                return True
            if self.counters.steps % self.k:
                continue
            pull = self.counters.steps % self.cfg.worker_update_interval < self.k
            done = self._push(samples, losses / self.k, pull)
            metrics.write(
                "step",
                step=self.counters.steps,
                loss=losses / self.k,
                version=self.version,
                bytes_sent=self.conn.bytes_sent,
                bytes_recv=self.conn.bytes_recv,
            )
            samples, losses = 0, 0.0
            if done:
                return True

    def _push(self, samples: int, loss: float, pull: bool) -> bool:
        delta = self.anchor - self.replica.params
        meta = {
            "base_version": self.version,
            "samples": samples,
            "steps": self.k,
            "loss": loss,
            "pull": pull,
        }
        if self.feedback is not None:
            encoded, _ = self.feedback.encode(delta)
            self.conn.send(MsgType.PUSH, meta, encoded.numpy(), FLAG_INT8)
        else:
            self.conn.send(MsgType.PUSH, meta, delta.numpy())
        reply = self.conn.expect(MsgType.WEIGHTS, MsgType.DONE)
        if reply.type == MsgType.DONE:
            return True
        if reply.meta.get("weights"):
            if reply.flags & FLAG_INT8:
                delta_in = torch.empty(self.replica.numel)
                _decode_into(reply, delta_in)
                self.mirror.add_(delta_in)
            else:
                _decode_into(reply, self.mirror)
            self.replica.params.copy_(self.mirror)
            self.version = reply.meta["version"]
        self.progress = _progress(reply.meta, self.progress)
        self.anchor.copy_(self.replica.params)
        return False

    def _server_said_done(self) -> bool:
        """The server only speaks unasked to end the run (DONE) or to refuse us (ERROR)."""
        readable, _, _ = select.select([self.conn.sock], [], [], 0)
        if not readable:
            return False
        frame = self.conn.expect(MsgType.DONE)
        return frame.type == MsgType.DONE
