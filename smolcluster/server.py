"""The parameter server: admits authenticated workers and drives synchronous training.

Threads: one accepts connections, one per connection authenticates and then reads frames into
the event queue (smolcluster.listener). Only the main thread changes training state or sends,
and every send and read has a deadline (smolcluster.protocol), so a broken peer can only ever
close its own connection.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from smolcluster import checkpoint, quantize
from smolcluster.balance import Balancer
from smolcluster.config import Settings
from smolcluster.data import evaluate
from smolcluster.listener import Listener, raise_file_limit
from smolcluster.metrics import Metrics, run_name
from smolcluster.plan import Plan, load_test, make_plan, shard_loader, train_size
from smolcluster.protocol import (
    FLAG_INT8,
    Connection,
    Deadlines,
    Frame,
    MsgType,
    PeerClosed,
    ProtocolError,
    payload_digest,
    read_secret,
)
from smolcluster.replica import Replica

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
    decoded: torch.Tensor | None = None  # int8 gradients are decoded here

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


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.cluster
        self.secret = read_secret(settings.secret_path)
        self.events: queue.Queue[Joined | Received | Gone] = queue.Queue()
        self.active: list[Peer] = []
        self.pending: list[Peer] = []
        self.history: list[Peer] = []  # every peer that ever trained, for the summary
        self.hosts_connected: set[str] = set()
        self.lock = threading.Lock()
        self.checksum_mismatches = 0
        self.stopping = threading.Event()
        self.terminate = threading.Event()  # SIGTERM/SIGINT: checkpoint and exit
        self.listener: Listener | None = None
        self.payload_limits: dict[MsgType, int] = {}  # what a worker's frames may carry
        # Progress that a checkpoint carries across a restart.
        self.step = 0  # sync: optimizer steps taken; elastic: global version
        self.samples_merged = 0
        # balance: auto (sync): throughput estimates and sample cursors per host, and the
        # (cursor, samples) each peer was told to use for the step it computes next.
        self.balancer: Balancer | None = None
        if self.cfg.balance == "auto":
            self.balancer = Balancer(settings.nn.batch_size)
        self.assignment: dict[Peer, tuple[int, int]] = {}
        # cover_absent (sync, balance off): rank -> the absent workers' ranks whose batches it
        # computes besides its own in the step it computes next, as sent with AVERAGE/START.
        self.covering = self.cfg.mode == "sync" and self.cfg.cover_absent and self.balancer is None
        self.cover: dict[int, list[int]] = {}

    # -- connections ---------------------------------------------------------------------------
    def listen(self) -> None:
        raise_file_limit()
        sock = socket.create_server((self.cfg.bind_address, self.cfg.port), reuse_port=False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener = Listener(
            sock,
            self.secret,
            self.cfg.max_frame_bytes,
            deadlines(self.settings),
            self.cfg.max_handshakes,
            self.cfg.max_handshakes_per_address,
            self._serve_connection,
        )
        self.listener.start()
        log.info("listening on %s:%d", self.cfg.bind_address, self.cfg.port)

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
        reason = None
        if host not in self.cfg.workers:
            reason = f"host {host!r} is not in this cluster's workers"
        elif rank != self.cfg.rank_of(host):
            reason = f"{host} has rank {self.cfg.rank_of(host)}, not {rank!r}"
        elif hello.get("mode") != self.cfg.mode:
            reason = f"server runs mode {self.cfg.mode}, worker asked for {hello.get('mode')!r}"
        else:
            with self.lock:
                if host in self.hosts_connected:
                    reason = f"{host} is already connected"
                else:
                    self.hosts_connected.add(host)
        if reason:
            conn.send(MsgType.REJECT, {"reason": reason})
            conn.close()
            raise ProtocolError(reason)
        conn.send(MsgType.WELCOME, {"server": self.cfg.server, "mode": self.cfg.mode})
        return Peer(conn, host, rank)

    def drop(self, peer: Peer, reason: str, error: bool = False) -> None:
        if peer.left_at is None:
            peer.left_at = time.monotonic()
        for group in (self.active, self.pending):
            if peer in group:
                group.remove(peer)
                (log.error if error else log.warning)("dropped %s: %s", peer.name, reason)
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
        digest: bytes | None = None,
    ) -> bool:
        try:
            peer.conn.send(mtype, meta, payload, flags, digest)
            return True
        except PeerClosed as exc:
            self.drop(peer, f"send failed: {exc}")
            return False

    # -- the run -------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> int:
        settings, cfg, nn_cfg = self.settings, self.cfg, self.settings.nn
        x_test, y_test = load_test(settings)
        plan = make_plan(settings, train_size(settings))
        own = shard_loader(settings, 0) if cfg.server_trains else None
        replica = Replica.build(nn_cfg.model, nn_cfg.learning_rate, cfg.seed, nn_cfg.lr_schedule)
        if resume:
            self._resume(replica)
        name = run_name(
            "server", cfg.server, nn_cfg.learning_rate, nn_cfg.batch_size, cfg.num_workers
        )
        metrics = Metrics(
            settings.metrics_dir, cfg.server, "server", name, cfg.wandb_mode, _flat_config(settings)
        )
        self.evaluator = Evaluator(replica, x_test, y_test, metrics, plan, nn_cfg.eval_steps)
        log.info("dataset: %s", plan.dataset)
        log.info(
            "plan: %d steps (%d per epoch), batch %d per worker, %d workers, mode %s%s",
            plan.total_steps,
            plan.steps_per_epoch,
            nn_cfg.batch_size,
            cfg.num_workers,
            cfg.mode,
            ", int8 on the wire" if cfg.use_quantization else "",
        )
        metrics.write(
            "start",
            role="server",
            host=cfg.server,
            mode=cfg.mode,
            backend="socket",
            dataset=plan.dataset,
            workers=cfg.num_workers,
            total_steps=plan.total_steps,
            quantization=cfg.use_quantization,
            balance=cfg.balance,
            resumed_at=self.step if resume else None,
        )
        # Every part of the run waits through next_event, which honours these at once.
        self.payload_limits = {MsgType.GRADS: replica.nbytes, MsgType.PUSH: replica.nbytes}
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.terminate.set())
        self.listen()
        try:
            self._wait_for_workers()
            if cfg.mode == "elastic":
                from smolcluster.elastic import ElasticLoop

                ElasticLoop(self, plan, replica, metrics).run()
            else:
                self._train(plan, replica, own, metrics)
        except Terminated:
            self._checkpoint(replica)
            log.warning("stopped by SIGTERM/SIGINT at step %d; checkpoint saved", self.step)
            metrics.close()
            return 0
        finally:
            self.stopping.set()
            if self.listener is not None:
                self.listener.close()
        val_loss, accuracy = self.evaluator.last
        self._checkpoint(replica)
        replica.save(settings.metrics_dir / f"{cfg.server}-model.pt")
        for peer in list(self.active) + list(self.pending):
            self.send_to(peer, MsgType.DONE, {"final_accuracy": accuracy})
        self._await_goodbyes()
        metrics.write(
            "summary",
            role="server",
            host=cfg.server,
            mode=cfg.mode,
            steps=self.step,
            final_accuracy=accuracy,
            final_val_loss=val_loss,
            dataset=plan.dataset,
            samples=self.samples_merged,
            checksum_mismatches=self.checksum_mismatches,
            bytes_sent=sum(p.conn.bytes_sent for p in self.history),
            bytes_recv=sum(p.conn.bytes_recv for p in self.history),
            workers=self._per_host(),
        )
        metrics.close()
        log.info(
            "done: %d steps, test accuracy %.4f, test loss %.4f", self.step, accuracy, val_loss
        )
        return 0

    # -- durability ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.settings.checkpoint_dir / f"{self.cfg.server}.pt"

    def _checkpoint(self, replica: Replica) -> None:
        params, exp_avg, exp_avg_sq = replica.state_tensors()
        checkpoint.save(
            self.checkpoint_path,
            {
                "format": 1,
                "mode": self.cfg.mode,
                "step": self.step,
                "samples_merged": self.samples_merged,
                "params": params,
                "exp_avg": exp_avg,
                "exp_avg_sq": exp_avg_sq,
                "optimizer_step": replica.optimizer_step,
                "torch_rng": torch.get_rng_state(),
                "members": sorted({p.host for p in self.active}),
                "cursors": dict(self.balancer.cursors) if self.balancer else {},
            },
        )

    def _resume(self, replica: Replica) -> None:
        state = checkpoint.load(self.checkpoint_path)
        if state is None:
            log.warning("--resume: no checkpoint at %s; starting from step 0", self.checkpoint_path)
            return
        if state["mode"] != self.cfg.mode:
            raise RuntimeError(
                f"checkpoint {self.checkpoint_path} is from a {state['mode']} "
                f"run, this run is {self.cfg.mode}"
            )
        replica.load_state_buffer(
            torch.cat([state["params"], state["exp_avg"], state["exp_avg_sq"]]),
            state["optimizer_step"],
        )
        torch.set_rng_state(state["torch_rng"])
        self.step, self.samples_merged = state["step"], state["samples_merged"]
        if self.balancer is not None:
            self.balancer.cursors.update(state.get("cursors", {}))
        log.info(
            "resumed from %s at step %d (members then: %s)",
            self.checkpoint_path,
            self.step,
            ", ".join(state["members"]) or "none",
        )

    def next_event(self, timeout: float) -> Joined | Received | Gone | None:
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

    def boundary(self, replica: Replica) -> None:
        """Between steps: checkpoint on schedule; honour SIGTERM."""
        if self.terminate.is_set():
            raise Terminated
        if self.step % self.cfg.checkpoint_every == 0:
            self._checkpoint(replica)

    def _wait_for_workers(self) -> None:
        deadline = time.monotonic() + self.cfg.join_timeout_s
        # Sync waits for everyone (or the timeout); elastic starts with the first min_workers
        # because anyone may join later at no cost to the others.
        wanted = self.cfg.min_workers if self.cfg.mode == "elastic" else self.cfg.num_workers
        while len(self.pending) < wanted:
            event = self.next_event(deadline - time.monotonic())
            if event is None:
                break
            self._handle_membership(event)
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

    def _handle_membership(self, event: Joined | Received | Gone) -> None:
        if isinstance(event, Joined):
            log.info("%s joined", event.peer.name)
            self.pending.append(event.peer)
        elif isinstance(event, Gone) and (event.peer in self.active or event.peer in self.pending):
            self.drop(event.peer, event.reason)

    def _admit_pending(self, step: int, replica: Replica, plan: Plan) -> None:
        if not self.pending:
            return
        if self.covering and not self.cover:
            self._cover_next()  # first step, or after a step nobody answered
        # A joiner whose batch a survivor was already told to compute waits one step, so no
        # batch counts twice; it was pending when the next cover was made, so then it goes.
        covered = {r for peer in self.active for r in self.cover.get(peer.rank, [])}
        state = replica.state_buffer()
        for peer in [p for p in self.pending if p.rank not in covered]:
            meta = {
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
                    self.assignment[peer] = (cursor, self.settings.nn.batch_size)
                meta["cursor"], meta["batch"] = self.assignment[peer]
            if self.cover.get(peer.rank):
                meta["cover"] = self.cover[peer.rank]
            if self.send_to(peer, MsgType.START, meta, state.numpy()):
                self.pending.remove(peer)
                self.active.append(peer)
                self.history.append(peer)

    def _train(self, plan: Plan, replica: Replica, own: Any, metrics: Metrics) -> None:
        cfg, nn_cfg = self.cfg, self.settings.nn
        own_grads = torch.zeros(replica.numel)
        progress = tqdm(
            total=plan.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not sys.stderr.isatty(),
        )
        while self.step < plan.total_steps:
            step = self.step
            self._admit_pending(step, replica, plan)
            started = time.monotonic()
            parts: list[tuple[int, torch.Tensor]] = []
            loss_sum = 0.0
            if own is not None:
                epoch, i = plan.position(step)
                x, y = own.batch(epoch, i)
                loss_sum += replica.compute_gradients(x, y) * len(y)
                own_grads.copy_(replica.grads)
                parts.append((len(y), own_grads))
            answered = self._collect(step, replica)
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
                if not self.active and not self.pending:
                    self._wait_for_rejoin()
                continue  # nobody answered: run this step again with whoever is there
            samples = replica.average_into_grads(parts)
            flags, payload = 0, replica.grads.numpy()
            if cfg.use_quantization:
                encoded = quantize.encode(replica.grads)
                quantize.decode(encoded, replica.numel, out=replica.grads)
                flags, payload = FLAG_INT8, encoded.numpy()
            last = step + 1 == plan.total_steps
            if self.balancer is not None and not last:
                self._split_next(step + 1)
            if self.covering:
                self._cover_next()
            digest = payload_digest(payload)  # one pass over the average for all N frames
            for peer in answered:
                meta = {"step": step, "last": last}
                if peer in self.assignment:
                    meta["cursor"], meta["batch"] = self.assignment[peer]
                if self.cover.get(peer.rank):
                    meta["cover"] = self.cover[peer.rank]
                self.send_to(peer, MsgType.AVERAGE, meta, payload, flags, digest)
            grad_norms = replica.grad_norms() if nn_cfg.track_gradients else None
            replica.step(step / plan.total_steps)
            self.step += 1
            self.samples_merged += samples
            progress.update(1)
            elapsed = time.monotonic() - started
            metrics.write(
                "step",
                step=self.step,
                epoch=plan.epoch_of(step),
                loss=loss_sum / samples,
                samples=samples,
                workers=len(answered),
                batch_sizes={p.host: part[0] for p, part in answered.items()},
                step_time_s=round(elapsed, 6),
                samples_per_s=round(samples / elapsed, 2) if elapsed else None,
                bytes_sent=sum(p.conn.bytes_sent for p in self.history),
                bytes_recv=sum(p.conn.bytes_recv for p in self.history),
                **({"grad_norms": grad_norms} if grad_norms else {}),
            )
            self.evaluator.maybe(self.step, loss_sum / samples, final=last)
            self.boundary(replica)
        progress.close()

    def _split_next(self, step: int) -> None:
        """balance: auto: who computes `step` (active, and pending joiners) and on how many
        samples each, in proportion to their measured throughput; sent with AVERAGE/START."""
        assert self.balancer is not None
        peers = sorted(self.active + self.pending, key=lambda p: p.rank)
        sizes = self.balancer.split([p.host for p in peers])
        self.assignment = {
            peer: (self.balancer.cursor(peer.host, step), n)
            for peer, n in zip(peers, sizes, strict=True)
        }

    def _cover_next(self) -> None:
        """cover_absent: deal the absent workers' ranks round-robin to the present ones (active
        and pending joiners, by rank), so the next step draws every shard's batch as planned."""
        present = sorted({p.rank for p in self.active + self.pending})
        absent = [r for r in range(1, self.cfg.num_workers + 1) if r not in present]
        self.cover = {}
        if present:
            for j, rank in enumerate(absent):
                self.cover.setdefault(present[j % len(present)], []).append(rank)

    def _collect(self, step: int, replica: Replica) -> dict[Peer, tuple[int, float, torch.Tensor]]:
        """Gradients of this step from every active worker; drop who misses the deadline.

        fp32 gradients stay in the connection's receive buffer, which the worker cannot
        overwrite before it gets this step's average."""
        answered: dict[Peer, tuple[int, float, torch.Tensor]] = {}
        expected_checksum = replica.checksum() if step % self.cfg.checksum_interval == 0 else None
        deadline = time.monotonic() + self.cfg.step_timeout_s
        while any(p not in answered for p in self.active):
            event = self.next_event(deadline - time.monotonic())
            if event is None:
                for peer in [p for p in self.active if p not in answered]:
                    self.drop(
                        peer, f"no gradients for step {step} within {self.cfg.step_timeout_s:.0f} s"
                    )
                break
            if not isinstance(event, Received):
                self._handle_membership(event)
                continue
            peer, frame = event.peer, event.frame
            if peer not in self.active or frame.type == MsgType.HEARTBEAT:
                continue
            try:
                answered[peer] = self._gradients(peer, frame, step, replica, expected_checksum)
            except ProtocolError as exc:
                self.drop(peer, str(exc), error=True)
        return answered

    def _gradients(
        self, peer: Peer, frame: Frame, step: int, replica: Replica, expected_checksum: str | None
    ) -> tuple[int, float, torch.Tensor]:
        meta = frame.meta
        if frame.type != MsgType.GRADS:
            raise ProtocolError(f"unexpected {frame.type.name} during step {step}")
        if meta.get("step") != step:
            raise ProtocolError(f"gradients for step {meta.get('step')!r}, expected {step}")
        n, loss = meta.get("samples"), meta.get("loss")
        if not isinstance(n, int) or n <= 0 or not isinstance(loss, int | float):
            raise ProtocolError("gradients without a valid sample count and loss")
        assigned = self._assigned_samples(peer)
        if assigned is not None and n != assigned:
            raise ProtocolError(f"gradients of {n} samples, assigned {assigned}")
        compute_s = meta.get("compute_s")
        valid = isinstance(compute_s, int | float) and 0 <= compute_s < float("inf")
        peer.compute_s = float(compute_s) if valid else None
        if expected_checksum is not None and meta.get("checksum") != expected_checksum:
            self.checksum_mismatches += 1
            raise ProtocolError(
                f"parameter checksum {meta.get('checksum')!r} differs from the "
                f"server's {expected_checksum} at step {step}: replica diverged"
            )
        expected = (
            quantize.encoded_nbytes(replica.numel) if frame.flags & FLAG_INT8 else replica.nbytes
        )
        if frame.payload.nbytes != expected:
            raise ProtocolError(
                f"gradient payload of {frame.payload.nbytes} bytes, expected {expected}"
            )
        if frame.flags & FLAG_INT8:
            raw = torch.frombuffer(frame.payload, dtype=torch.uint8)
            if peer.decoded is None:
                peer.decoded = torch.empty(replica.numel)
            grads = quantize.decode(raw, replica.numel, out=peer.decoded)
        else:
            grads = torch.frombuffer(frame.payload, dtype=torch.float32)
        if not torch.isfinite(grads.sum()):  # any NaN/inf makes the sum non-finite; 30x cheaper
            raise ProtocolError("non-finite gradients")
        return n, float(loss), grads

    def _assigned_samples(self, peer: Peer) -> int | None:
        """The samples the server told `peer` to compute this step; None: not checked (a
        balanced joiner's first, plain batch)."""
        if self.balancer is not None:
            return self.assignment[peer][1] if peer in self.assignment else None
        if self.covering:
            return self.settings.nn.batch_size * (1 + len(self.cover.get(peer.rank, [])))
        return None

    def _per_host(self) -> dict[str, dict[str, float]]:
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

    def _wait_for_rejoin(self) -> None:
        log.warning(
            "no workers left; waiting up to %.0f s for one to join", self.cfg.join_timeout_s
        )
        event = self.next_event(self.cfg.join_timeout_s)
        if event is None:
            raise RuntimeError("every worker is gone and none came back")
        self._handle_membership(event)

    def _await_goodbyes(self, timeout: float = 5.0) -> None:
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


class Terminated(Exception):
    """SIGTERM arrived; the run stops at a step boundary after a checkpoint."""


class Evaluator:
    """Test-split evaluation every eval_steps and at the end; remembers the latest result."""

    def __init__(
        self,
        replica: Replica,
        x: torch.Tensor,
        y: torch.Tensor,
        metrics: Metrics,
        plan: Plan,
        every: int,
    ) -> None:
        self.replica, self.x, self.y, self.metrics, self.plan = replica, x, y, metrics, plan
        self.every = every
        self.last = (float("nan"), float("nan"))

    def maybe(self, step: int, loss: float, final: bool = False) -> None:
        if step % self.every and not final:
            return
        self.last = evaluate(self.replica.model, self.x, self.y)
        val_loss, accuracy = self.last
        self.metrics.write(
            "eval",
            step=step,
            epoch=self.plan.epoch_of(max(step - 1, 0)),
            val_loss=val_loss,
            val_accuracy=accuracy,
        )
        log.info(
            "step %d/%d  loss %.4f  test loss %.4f  test accuracy %.4f",
            step,
            self.plan.total_steps,
            loss,
            val_loss,
            accuracy,
        )


def deadlines(settings: Settings) -> Deadlines:
    cfg = settings.cluster
    return Deadlines(cfg.handshake_timeout_s, cfg.frame_timeout_s, cfg.send_timeout_s)


def _flat_config(settings: Settings) -> dict[str, Any]:
    return {**settings.cluster.model_dump(), **settings.nn.model_dump()}
