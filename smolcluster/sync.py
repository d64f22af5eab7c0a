"""Sync mode, both ends: every step the server averages all workers' gradients and sends the
average back; every replica applies the same average with the same Adam, so they stay
bit-identical (checked by parameter checksums) and equal to one process on the joint batch.

The server end (`SyncLoop`) talks to workers only through a `Hub`; the worker end
(`SyncWorker`) over the one connection it dialled. docs/algorithms.md explains balance: auto
and cover_absent.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from smolcluster.balance import Balancer
from smolcluster.checkpoint import Checkpointer, Progress
from smolcluster.codec import Codec
from smolcluster.config import ClusterConfig, Settings
from smolcluster.data import ShardLoader
from smolcluster.evaluator import Evaluator
from smolcluster.hub import Hub, Peer, Received
from smolcluster.metrics import Metrics
from smolcluster.plan import Plan
from smolcluster.protocol import (
    Connection,
    Frame,
    MsgType,
    ProtocolError,
    json_int,
    json_number,
)
from smolcluster.replica import Replica


class Round(NamedTuple):
    """One sync step at the server: who answered with how many samples, and the loss sum."""

    batch_sizes: dict[Peer, int]
    samples: int
    loss_sum: float


class SyncLoop:
    """The server end: admit joiners at step boundaries, collect every active worker's
    gradients, average them in rank order, send the average back, step."""

    def __init__(
        self,
        hub: Hub,
        settings: Settings,
        plan: Plan,
        replica: Replica,
        progress: Progress,
        codec: Codec,
        balancer: Balancer | None = None,
        own: ShardLoader | None = None,
    ) -> None:
        self.hub, self.plan, self.replica, self.progress = hub, plan, replica, progress
        self.codec = codec
        self.decoded: dict[Peer, torch.Tensor] = {}  # a lossy codec's gradients, per peer
        self.cfg, self.batch_size = settings.cluster, settings.nn.batch_size
        self.track_gradients = settings.nn.track_gradients
        self.own = own  # server_trains: the server's own shard, rank 0
        self.own_grads = torch.zeros(replica.numel)
        # balance: auto: throughput estimates and sample cursors per host, and the
        # (cursor, samples) each peer was told to use for the step it computes next.
        self.balancer = balancer
        self.assignment: dict[Peer, tuple[int, int]] = {}
        # cover_absent (balance off): rank -> the absent workers' ranks whose batches it
        # computes besides its own in the step it computes next, as sent with AVERAGE/START.
        self.covering = self.cfg.cover_absent and balancer is None
        self.cover: dict[int, list[int]] = {}

    def run(self, metrics: Metrics, evaluator: Evaluator, checkpoints: Checkpointer) -> None:
        plan, replica, progress = self.plan, self.replica, self.progress
        bar = tqdm(
            total=plan.total_steps,
            initial=progress.step,
            desc="train",
            unit="step",
            disable=not sys.stderr.isatty(),
        )
        while progress.step < plan.total_steps:
            step = progress.step
            started = time.monotonic()
            done = self.exchange(step)
            if done is None:
                continue  # nobody answered: run this step again with whoever is there
            exchanged = time.monotonic() - started
            last = step + 1 == plan.total_steps
            grad_norms = replica.grad_norms() if self.track_gradients else None
            replica.step(step / plan.total_steps)
            progress.step += 1
            progress.samples_merged += done.samples
            bar.update(1)
            elapsed = time.monotonic() - started
            metrics.write(
                "step",
                step=progress.step,
                epoch=plan.epoch_of(step),
                loss=done.loss_sum / done.samples,
                samples=done.samples,
                workers=len(done.batch_sizes),
                batch_sizes={p.host: n for p, n in done.batch_sizes.items()},
                step_time_s=round(elapsed, 6),
                exchange_s=round(exchanged, 6),
                samples_per_s=round(done.samples / elapsed, 2) if elapsed else None,
                bytes_sent=self.hub.bytes_sent,
                bytes_recv=self.hub.bytes_recv,
                **({"grad_norms": grad_norms} if grad_norms else {}),
            )
            evaluator.maybe(progress.step, done.loss_sum / done.samples, final=last)
            checkpoints.boundary()
        bar.close()

    def exchange(self, step: int) -> Round | None:
        """One step's gradient exchange: start joiners, collect, average into replica.grads
        and send the average to who answered. None: nobody answered (the step runs again)."""
        plan, replica = self.plan, self.replica
        self.admit_pending(step)
        parts: list[tuple[int, torch.Tensor]] = []
        loss_sum = 0.0
        if self.own is not None:
            epoch, i = plan.position(step)
            x, y = self.own.batch(epoch, i)
            loss_sum += replica.compute_gradients(x, y) * len(y)
            self.own_grads.copy_(replica.grads)
            parts.append((len(y), self.own_grads))
        answered = self.collect(step)
        for peer, (n, loss, grads) in sorted(answered.items(), key=lambda kv: kv[0].rank):
            parts.append((n, grads))
            loss_sum += loss * n
            peer.samples += n
            peer.steps += 1
            if self.balancer is not None:
                self.balancer.advance(peer.host, n)
                if peer.compute_s is not None:
                    self.balancer.observe(peer.host, n, peer.compute_s)
        if not parts:
            self.cover = {}
            if not self.hub.active and not self.hub.pending:
                self.hub.wait_for_rejoin()
            return None
        samples = replica.average_into_grads(parts)
        # The server steps on the average exactly as the workers decode it.
        payload = self.codec.round_trip(replica.grads).numpy()
        last = step + 1 == plan.total_steps
        if self.balancer is not None and not last:
            self.split_next(step + 1)
        if self.covering:
            self.cover_next()
        # One pass over the average for all N frames: sealed once under the broadcast key.
        sealed = self.hub.broadcast.seal(MsgType.AVERAGE, step, payload, self.codec.flags)
        for peer in answered:
            meta: dict[str, Any] = {"step": step, "last": last}
            if peer in self.assignment:
                meta["cursor"], meta["batch"] = self.assignment[peer]
            if self.cover.get(peer.rank):
                meta["cover"] = self.cover[peer.rank]
            self.hub.send_to(peer, MsgType.AVERAGE, meta, sealed=sealed)
        return Round({p: part[0] for p, part in answered.items()}, samples, loss_sum)

    def admit_pending(self, step: int) -> None:
        """START every pending joiner at this step with the full replica state."""
        hub, replica, plan = self.hub, self.replica, self.plan
        if not hub.pending:
            return
        if self.covering and not self.cover:
            self.cover_next()  # first step, or after a step nobody answered
        # A joiner whose batch a survivor was already told to compute waits one step, so no
        # batch counts twice; it was pending when the next cover was made, so then it goes.
        covered = {r for peer in hub.active for r in self.cover.get(peer.rank, [])}
        state = replica.state_buffer()
        for peer in [p for p in hub.pending if p.rank not in covered]:
            meta: dict[str, Any] = {
                "step": step,
                "total_steps": plan.total_steps,
                "steps_per_epoch": plan.steps_per_epoch,
                "optimizer_step": replica.optimizer_step,
                "numel": replica.numel,
            }
            if self.balancer is not None:
                # Nobody measured it in the last step's split: a plain batch to start with.
                if peer not in self.assignment:
                    cursor = self.balancer.cursor(peer.host, step)
                    self.assignment[peer] = (cursor, self.batch_size)
                meta["cursor"], meta["batch"] = self.assignment[peer]
            if self.cover.get(peer.rank):
                meta["cover"] = self.cover[peer.rank]
            hub.activate(peer, meta, state.numpy())

    def split_next(self, step: int) -> None:
        """balance: auto: who computes `step` (active, and pending joiners) and on how many
        samples each, in proportion to their measured throughput; sent with AVERAGE/START."""
        assert self.balancer is not None
        peers = sorted(self.hub.active + self.hub.pending, key=lambda p: p.rank)
        sizes = self.balancer.split([p.host for p in peers])
        self.assignment = {
            peer: (self.balancer.cursor(peer.host, step), n)
            for peer, n in zip(peers, sizes, strict=True)
        }

    def cover_next(self) -> None:
        """cover_absent: deal the absent workers' ranks round-robin to the present ones (active
        and pending joiners, by rank), so the next step draws every shard's batch as planned."""
        present = sorted({p.rank for p in self.hub.active + self.hub.pending})
        self.cover = deal_cover(present, self.cfg.num_workers)

    def collect(self, step: int) -> dict[Peer, tuple[int, float, torch.Tensor]]:
        """Gradients of this step from every active worker; drop who misses the deadline.

        fp32 gradients stay in the connection's receive buffer, which the worker cannot
        overwrite before it gets this step's average."""
        hub = self.hub
        answered: dict[Peer, tuple[int, float, torch.Tensor]] = {}
        checksum = self.replica.checksum() if step % self.cfg.checksum_interval == 0 else None
        deadline = time.monotonic() + self.cfg.step_timeout_s
        while any(p not in answered for p in hub.active):
            event = hub.next_event(deadline - time.monotonic())
            if event is None:
                for peer in [p for p in hub.active if p not in answered]:
                    hub.drop(
                        peer, f"no gradients for step {step} within {self.cfg.step_timeout_s:.0f} s"
                    )
                break
            if not isinstance(event, Received):
                hub.handle_membership(event)
                continue
            peer, frame = event.peer, event.frame
            if peer not in hub.active or frame.type == MsgType.HEARTBEAT:
                continue
            try:
                answered[peer] = self.gradients(peer, frame, step, checksum)
            except ProtocolError as exc:
                hub.drop(peer, str(exc), error=True)
        return answered

    def gradients(
        self, peer: Peer, frame: Frame, step: int, expected_checksum: str | None
    ) -> tuple[int, float, torch.Tensor]:
        """(samples, loss, gradients) of one GRADS frame, every field checked."""
        meta, replica = frame.meta, self.replica
        if frame.type != MsgType.GRADS:
            raise ProtocolError(f"unexpected {frame.type.name} during step {step}")
        n, loss = grads_counts(meta, step)
        assigned = self.assigned_samples(peer)
        if assigned is not None and n != assigned:
            raise ProtocolError(f"gradients of {n} samples, assigned {assigned}")
        compute_s = meta.get("compute_s")
        valid = isinstance(compute_s, int | float) and 0 <= compute_s < float("inf")
        peer.compute_s = float(compute_s) if valid else None
        if expected_checksum is not None and meta.get("checksum") != expected_checksum:
            self.progress.checksum_mismatches += 1
            raise ProtocolError(
                f"parameter checksum {meta.get('checksum')!r} differs from the "
                f"server's {expected_checksum} at step {step}: replica diverged"
            )
        out = None  # exact: a view of the payload
        if not self.codec.exact:
            if peer not in self.decoded:
                self.decoded[peer] = torch.empty(replica.numel)
            out = self.decoded[peer]
        grads = self.codec.read(frame, replica.numel, out)
        if not torch.isfinite(grads.sum()):  # any NaN/inf makes the sum non-finite; 30x cheaper
            raise ProtocolError("non-finite gradients")
        return n, float(loss), grads

    def assigned_samples(self, peer: Peer) -> int | None:
        """The samples the server told `peer` to compute this step; None: not checked (a
        balanced joiner's first, plain batch)."""
        if self.balancer is not None:
            return self.assignment[peer][1] if peer in self.assignment else None
        if self.covering:
            return self.batch_size * (1 + len(self.cover.get(peer.rank, [])))
        return None


def grads_counts(meta: dict, step: int) -> tuple[int, float]:
    """A GRADS frame's sample count and loss, checked; a bad one is a protocol error."""
    if not json_int(meta.get("step")) or meta["step"] != step:
        raise ProtocolError(f"gradients for step {meta.get('step')!r}, expected {step}")
    n, loss = meta.get("samples"), meta.get("loss")
    if not json_int(n) or n <= 0 or not json_number(loss):
        raise ProtocolError("gradients without a valid sample count and loss")
    return n, float(loss)


def deal_cover(present: list[int], num_workers: int) -> dict[int, list[int]]:
    """The absent ranks of 1..num_workers dealt round-robin to the present ones, in order."""
    absent = [r for r in range(1, num_workers + 1) if r not in present]
    cover: dict[int, list[int]] = {}
    if present:
        for j, rank in enumerate(absent):
            cover.setdefault(present[j % len(present)], []).append(rank)
    return cover


class SyncWorker:
    """The worker end, across reconnects: load START, apply each AVERAGE, compute and send the
    next step's gradients on the batch the server assigned (plain, balanced or covering)."""

    def __init__(
        self,
        cfg: ClusterConfig,
        rank: int,
        plan: Plan,
        replica: Replica,
        loader_of: Callable[[int], ShardLoader],
        throttle_s: float,
        counters: Any,
        codec: Codec,
    ) -> None:
        self.cfg, self.rank, self.plan, self.replica = cfg, rank, plan, replica
        self.codec = codec
        self.loader_of, self.throttle_s = loader_of, throttle_s
        self.counters = counters  # steps, samples, bytes_sent, bytes_recv of the worker
        self.last_step: tuple[float, float] | None = None  # (started, sent) of the last step
        # balance: auto: (cursor, samples) the server assigned for the next step; None means
        # the plain batch of the step (ShardLoader.batch).
        self.assigned: tuple[int, int] | None = None
        # cover_absent: ranks of absent workers whose plain batches this worker computes too.
        self.cover: list[int] = []
        self.staging: torch.Tensor | None = None  # a lossy codec's averages land here

    def average_target(self) -> memoryview:
        """Where AVERAGE payloads land: the gradient buffer itself when exact."""
        replica = self.replica
        if self.codec.exact:
            return memoryview(replica.grads.numpy())
        if self.staging is None:
            self.staging = torch.empty(self.codec.nbytes(replica.numel), dtype=torch.uint8)
        return memoryview(self.staging.numpy())

    def start(self, frame: Frame) -> int:
        """Load the replica state a START carries; returns the step to compute."""
        replica = self.replica
        step, optimizer_step = frame.meta.get("step"), frame.meta.get("optimizer_step")
        if not (isinstance(step, int) and isinstance(optimizer_step, int)):
            raise ProtocolError(f"START without a valid step: {step!r}")
        if frame.payload.nbytes != 3 * replica.nbytes:
            raise ProtocolError(f"START of {frame.payload.nbytes} bytes")
        state = torch.frombuffer(frame.payload, dtype=torch.float32)
        replica.load_state_buffer(state, optimizer_step)
        self.assigned = assignment(frame.meta)
        self.cover = self.cover_of(frame.meta)
        return step

    def average(self, frame: Frame, step: int) -> bool:
        """Apply the AVERAGE of `step`; True if it was the run's last step (DONE follows)."""
        if frame.meta.get("step") != step:
            raise ProtocolError(f"average for step {frame.meta.get('step')}, expected {step}")
        # Exact: the payload already is replica.grads (average_target), read only checks it.
        out = None if self.codec.exact else self.replica.grads
        self.codec.read(frame, self.replica.numel, out)
        self.replica.step(step / self.plan.total_steps)
        self.assigned = assignment(frame.meta)
        self.cover = self.cover_of(frame.meta)
        return bool(frame.meta.get("last"))

    def cover_of(self, meta: dict) -> list[int]:
        ranks = meta.get("cover", [])
        valid = range(1, self.cfg.num_workers + 1)
        if not isinstance(ranks, list) or any(
            not isinstance(r, int) or r not in valid or r == self.rank for r in ranks
        ):
            raise ProtocolError(f"bad cover list {ranks!r}")
        return ranks

    def send_gradients(self, conn: Connection, step: int, metrics: Metrics) -> None:
        replica, loader, counters = self.replica, self.loader_of(self.rank), self.counters
        started = time.monotonic()
        epoch, i = self.plan.position(step)
        meta: dict = {"step": step}
        if step % self.cfg.checksum_interval == 0:
            meta["checksum"] = replica.checksum()
        computing = time.monotonic()
        if self.assigned is not None:
            x, y = loader.take(*self.assigned)
        else:
            x, y = loader.batch(epoch, i)
        if self.cover:
            # One forward/backward over all the batches: the mean gradient of the lot, which
            # the server weights by the sample count like anyone else's.
            extra = [self.loader_of(rank).batch(epoch, i) for rank in self.cover]
            x = torch.cat([x, *(b[0] for b in extra)])
            y = torch.cat([y, *(b[1] for b in extra)])
        meta["samples"] = len(y)
        meta["loss"] = replica.compute_gradients(x, y)
        if self.throttle_s:
            # Proportional to the work, as a slower machine would be: throttle_s per
            # batch_size samples (exactly throttle_s per step unless balancing resizes it).
            time.sleep(self.throttle_s * (len(y) / loader.batch_size))
        # What the server balances on: drawing the batch, forward/backward (and throttle).
        meta["compute_s"] = round(time.monotonic() - computing, 6)
        conn.send(MsgType.GRADS, meta, self.codec.encode(replica.grads).numpy(), self.codec.flags)
        counters.samples += len(y)
        counters.steps += 1
        now = time.monotonic()
        # wait_s: from sending the last gradients to starting this step (the average's
        # round trip plus the optimizer step); step_time_s: start to start.
        previous = self.last_step
        self.last_step = (started, now)
        metrics.write(
            "step",
            wait_s=round(started - previous[1], 6) if previous else None,
            step_time_s=round(started - previous[0], 6) if previous else None,
            step=step + 1,
            epoch=epoch,
            loss=meta["loss"],
            samples=len(y),
            compute_s=meta["compute_s"],
            bytes_sent=counters.bytes_sent + conn.bytes_sent,
            bytes_recv=counters.bytes_recv + conn.bytes_recv,
        )


def assignment(meta: dict) -> tuple[int, int] | None:
    """The (cursor, samples) a balanced sync step was assigned in START or AVERAGE."""
    cursor, batch = meta.get("cursor"), meta.get("batch")
    if cursor is None and batch is None:
        return None
    if not (isinstance(cursor, int) and isinstance(batch, int) and cursor >= 0 and batch >= 1):
        raise ProtocolError(f"bad batch assignment: cursor {cursor!r}, batch {batch!r}")
    return cursor, batch
