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

import torch
from tqdm import tqdm

from smolcluster.checkpoint import Checkpointer, Progress
from smolcluster.codec import FP32, Codec, ErrorFeedback
from smolcluster.config import Settings
from smolcluster.data import ShardLoader
from smolcluster.evaluator import Evaluator
from smolcluster.hub import Hub, Peer, Received
from smolcluster.metrics import Metrics
from smolcluster.plan import Plan
from smolcluster.protocol import (
    Connection,
    Frame,
    MsgType,
    PeerClosed,
    ProtocolError,
    json_int,
    json_number,
)
from smolcluster.replica import Replica

log = logging.getLogger("smolcluster")


def push_interval(server_cfg) -> int:
    return server_cfg.push_interval or server_cfg.worker_update_interval


def eval_interval(server_cfg, eval_steps: int) -> int:
    """Pushes between evaluations: about as many evaluations as sync's eval_steps gives."""
    return max(1, eval_steps // push_interval(server_cfg))


def push_counts(meta: dict, version: int) -> tuple[int, int, int]:
    """A PUSH's base version, samples and local steps, checked; a bad one is a protocol error."""
    base, samples, steps = meta.get("base_version"), meta.get("samples"), meta.get("steps", 0)
    if not json_int(base) or not 0 <= base <= version:
        raise ProtocolError(f"push from version {base!r}, current is {version}")
    if not json_int(samples) or samples <= 0:
        raise ProtocolError("push without a valid sample count")
    if not json_int(steps) or steps < 0 or not json_number(meta.get("loss", float("nan"))):
        raise ProtocolError("push without a valid step count and loss")
    return base, samples, steps


def staleness_damping(staleness: int, exponent: float) -> float:
    """(1 + s) ** -exponent: a push made from an older version counts less."""
    return (1 + staleness) ** -exponent


def merge_weight(
    staleness: int, samples: int, push_interval: int, batch_size: int, active: int, exponent: float
) -> float:
    """How much of a pushed delta the outer step takes, before server_lr (module doc): damped
    by staleness, scaled by the push's share of a full K * b push, split among the active."""
    share = min(1.0, samples / (push_interval * batch_size))
    return staleness_damping(staleness, exponent) * share / max(1, active)


def outer_step(
    params: torch.Tensor,
    delta: torch.Tensor,
    momentum: torch.Tensor,
    weight: float,
    lr: float,
    mu: float,
) -> None:
    """w <- w - lr * (g + mu * m) with m <- mu * m + g, g = weight * delta (in place; delta
    ends up holding the step before lr).

    Nesterov momentum over pushes, as DiLoCo's outer optimizer; mu = 0 is plain SGD.
    """
    delta.mul_(weight)
    if mu:
        momentum.mul_(mu).add_(delta)
        delta.add_(momentum, alpha=mu)
    params.sub_(delta, alpha=lr)


class ElasticLoop:
    """The server side: admit, merge pushes, answer with weights, evict the silent."""

    def __init__(
        self,
        hub: Hub,
        settings: Settings,
        plan: Plan,
        replica: Replica,
        progress: Progress,
        codec: Codec,
    ) -> None:
        self.hub, self.plan, self.replica, self.progress = hub, plan, replica, progress
        self.codec = codec
        self.cfg = settings.cluster
        self.batch_size = settings.nn.batch_size
        # The same number of samples a sync run of this plan would process.
        self.budget = plan.total_steps * self.cfg.num_workers * self.batch_size
        self.delta = torch.zeros(replica.numel)
        # The outer optimizer's momentum. The server's own Adam is idle in elastic mode, so the
        # buffer lives in its first-moment slot: checkpoints and --resume carry it for free.
        self.momentum = replica.state_tensors()[1]
        # Lossy codec: the weights each worker holds of ours, so replies are exact differences.
        self.mirrors: dict[Peer, torch.Tensor] = {}

    def run(self, metrics: Metrics, evaluator: Evaluator, checkpoints: Checkpointer) -> None:
        hub, progress = self.hub, self.progress
        bar = tqdm(
            total=self.budget,
            initial=progress.samples_merged,
            desc="samples",
            unit="sample",
            disable=not sys.stderr.isatty(),
        )
        while progress.samples_merged < self.budget:
            self.admit()
            self.evict_silent()
            if not hub.active and not hub.pending:
                hub.wait_for_rejoin()
                continue
            event = hub.next_event(0.5)
            if event is None:
                continue
            if not isinstance(event, Received):
                hub.handle_membership(event)
                continue
            if event.peer not in hub.active:
                continue
            try:
                merged = self.merge(event.peer, event.frame, metrics)
            except ProtocolError as exc:
                hub.drop(event.peer, str(exc), error=True)
                continue
            bar.update(merged)
            last = progress.samples_merged >= self.budget
            evaluator.maybe(
                progress.step, float(event.frame.meta.get("loss", float("nan"))), final=last
            )
            checkpoints.boundary()
        bar.close()

    def admit(self) -> None:
        hub = self.hub
        for peer in list(hub.pending):
            meta = {
                "version": self.progress.step,
                "push_interval": push_interval(self.cfg),
                "numel": self.replica.numel,
                "total_steps": self.plan.total_steps,
                "progress": self.run_progress,
            }
            if hub.activate(peer, meta, self.replica.params.numpy()):
                peer.last_seen = time.monotonic()  # its heartbeats start with START
                if not self.codec.exact:
                    self.mirrors[peer] = self.replica.params.clone()
                log.info("%s starts at version %d", peer.name, self.progress.step)

    @property
    def run_progress(self) -> float:
        """How far the run is (samples merged / budget): the workers' lr schedule follows it."""
        return round(min(1.0, self.progress.samples_merged / self.budget), 6)

    def evict_silent(self) -> None:
        now = time.monotonic()
        for peer in list(self.hub.active):
            if now - peer.last_seen > self.cfg.heartbeat_timeout_s:
                self.hub.drop(peer, f"silent for {now - peer.last_seen:.0f} s")
                self.mirrors.pop(peer, None)

    def merge(self, peer: Peer, frame: Frame, metrics: Metrics) -> int:
        """Apply one PUSH to the global weights and answer it; returns its sample count."""
        hub, progress, meta = self.hub, self.progress, frame.meta
        if frame.type != MsgType.PUSH:
            raise ProtocolError(f"unexpected {frame.type.name} in elastic mode")
        base, samples, steps = push_counts(meta, progress.step)
        self.codec.read(frame, self.replica.numel, out=self.delta)
        if not torch.isfinite(self.delta.sum()):
            raise ProtocolError("non-finite update")
        staleness = progress.step - base
        weight = merge_weight(
            staleness,
            samples,
            push_interval(self.cfg),
            self.batch_size,
            len(hub.active),
            self.cfg.staleness_exponent,
        )
        outer_step(
            self.replica.params,
            self.delta,
            self.momentum,
            weight,
            self.cfg.server_lr,
            self.cfg.server_momentum,
        )
        progress.step += 1
        progress.samples_merged += samples
        peer.samples += samples
        peer.steps += steps
        self.reply(peer, bool(meta.get("pull")))
        metrics.write(
            "step",
            step=progress.step,
            host=peer.host,
            staleness=staleness,
            merge_weight=round(self.cfg.server_lr * weight, 6),
            samples=progress.samples_merged,
            loss=meta.get("loss"),
            workers=len(hub.active),
            bytes_sent=hub.bytes_sent,
            bytes_recv=hub.bytes_recv,
        )
        return samples

    def reply(self, peer: Peer, pull: bool) -> None:
        meta = {"version": self.progress.step, "weights": pull, "progress": self.run_progress}
        codec, params = self.codec, self.replica.params
        if not pull:
            self.hub.send_to(peer, MsgType.WEIGHTS, meta)
        elif codec.exact:
            self.hub.send_to(peer, MsgType.WEIGHTS, meta, params.numpy(), codec.flags)
        else:  # the difference from what the worker holds, which the worker adds
            mirror = self.mirrors[peer]
            encoded = codec.encode(params - mirror)
            mirror.add_(codec.decode(encoded, self.replica.numel))
            self.hub.send_to(peer, MsgType.WEIGHTS, meta, encoded.numpy(), codec.flags)


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
        codec: Codec,
    ) -> None:
        self.conn, self.cfg, self.loader, self.replica = conn, cfg, loader, replica
        self.codec = codec
        self.throttle_s, self.counters = throttle_s, counters
        self.k = start.meta["push_interval"]
        self.version = start.meta["version"]
        self.progress = _progress(start.meta)
        FP32.read(start, replica.numel, out=replica.params)
        self.anchor = replica.params.clone()  # where the current delta is measured from
        self.mirror = replica.params.clone()  # the global weights as we last received them
        self.feedback = None if codec.exact else ErrorFeedback(codec, replica.numel)
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
        # One window per push: K local steps (compute, throttle included: it stands for a slower
        # machine), then encode + send, then waiting for the server's reply and applying it.
        window = time.monotonic()
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
            computed = time.monotonic()
            done, sent = self._push(samples, losses / self.k, pull)
            ended = time.monotonic()
            elapsed = ended - window
            metrics.write(
                "step",
                step=self.counters.steps,
                loss=losses / self.k,
                version=self.version,
                samples=samples,
                compute_s=round(computed - window, 6),
                wait_s=round(ended - sent, 6),
                step_time_s=round(elapsed, 6),
                samples_per_s=round(samples / elapsed, 2) if elapsed else None,
                bytes_sent=self.conn.bytes_sent,
                bytes_recv=self.conn.bytes_recv,
            )
            samples, losses, window = 0, 0.0, ended
            if done:
                return True

    def _push(self, samples: int, loss: float, pull: bool) -> tuple[bool, float]:
        """Send the delta and apply the reply: (the server said DONE, when the send ended)."""
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
        else:
            encoded = self.codec.encode(delta)
        self.conn.send(MsgType.PUSH, meta, encoded.numpy(), self.codec.flags)
        sent = time.monotonic()
        reply = self.conn.expect(MsgType.WEIGHTS, MsgType.DONE)
        if reply.type == MsgType.DONE:
            return True, sent
        if reply.meta.get("weights"):
            if self.codec.exact:
                self.codec.read(reply, self.replica.numel, out=self.mirror)
            else:  # a difference from the weights we hold
                self.mirror.add_(self.codec.read(reply, self.replica.numel))
            self.replica.params.copy_(self.mirror)
            self.version = reply.meta["version"]
        self.progress = _progress(reply.meta, self.progress)
        self.anchor.copy_(self.replica.params)
        return False, sent

    def _server_said_done(self) -> bool:
        """The server only speaks unasked to end the run (DONE) or to refuse us (ERROR)."""
        readable, _, _ = select.select([self.conn.sock], [], [], 0)
        if not readable:
            return False
        frame = self.conn.expect(MsgType.DONE)
        return frame.type == MsgType.DONE
