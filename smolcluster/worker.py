"""A worker: dials the server, authenticates, and trains its shard in lockstep with the others.

The server decides everything about the run (start step, weights, optimizer state, the end);
the worker only computes gradients on its shard and applies the averages it gets back. If the
connection breaks, stalls past a deadline or carries garbage, it dials again with backoff and
the server resynchronizes it at a step boundary; only a refusal (REJECT, ERROR, or a server
that holds another secret) ends it.
"""

from __future__ import annotations

import logging
import socket
import time

from smolcluster import codec
from smolcluster.config import Settings
from smolcluster.data import ShardLoader
from smolcluster.elastic import ElasticSession
from smolcluster.metrics import Metrics, run_name
from smolcluster.plan import make_plan, shard_loader, train_size
from smolcluster.protocol import (
    Connection,
    Deadlines,
    MsgType,
    ProtocolError,
    Refused,
    client_handshake,
    read_secret,
)
from smolcluster.replica import Replica
from smolcluster.sync import SyncWorker

log = logging.getLogger("smolcluster")


class ServerGone(Exception):
    """The server stayed unreachable for all the configured retries."""


class Worker:
    def __init__(self, settings: Settings, host: str, throttle_s: float = 0.0) -> None:
        self.settings = settings
        self.cfg = settings.cluster
        self.host = host
        self.rank = self.cfg.rank_of(host)
        self.server_address = self.cfg.host_ip[host]
        self.throttle_s = throttle_s or self.cfg.throttle_s.get(host, 0.0)
        self.secret = read_secret(settings.secret_path)
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.samples = 0
        self.steps = 0
        self._loaders: dict[int, ShardLoader] = {}

    def connect(self) -> Connection:
        """Dial with exponential backoff capped at connect_backoff_s, connect_retries times."""
        delay = min(0.2, self.cfg.connect_backoff_s)
        target = (self.server_address, self.cfg.port)
        last_error: Exception | None = None
        cfg = self.cfg
        deadlines = Deadlines(cfg.handshake_timeout_s, cfg.frame_timeout_s, cfg.send_timeout_s)
        for attempt in range(1, self.cfg.connect_retries + 1):
            try:
                sock = socket.create_connection(target, timeout=self.cfg.handshake_timeout_s)
                conn, _ = client_handshake(
                    sock,
                    self.secret,
                    {"host": self.host, "rank": self.rank, "role": "worker", "mode": self.cfg.mode},
                    self.cfg.max_frame_bytes,
                    f"{target[0]}:{target[1]}",
                    deadlines,
                    self.cfg.cipher,
                )
                log.info("connected to %s:%d as %s (rank %d)", *target, self.host, self.rank)
                return conn
            except Refused:
                raise  # refused, or another secret: retrying cannot help
            except (ProtocolError, OSError) as exc:  # gone, restarting, or not a server of ours
                last_error = exc
            if attempt == 1 or attempt % 10 == 0:
                log.info("server %s:%d not reachable (%s); retrying", *target, last_error)
            time.sleep(delay)
            delay = min(delay * 2, self.cfg.connect_backoff_s)
        raise ServerGone(
            f"could not reach the server at {target[0]}:{target[1]} after "
            f"{self.cfg.connect_retries} attempts: {last_error}"
        )

    def run(self) -> int:
        settings, nn_cfg = self.settings, self.settings.nn
        plan = make_plan(settings, train_size(settings))
        loader = self._loader(self.rank)
        replica = Replica.build(
            nn_cfg.model,
            nn_cfg.learning_rate,
            self.cfg.seed,
            nn_cfg.lr_schedule,
            nn_cfg.fused_adam,
        )
        self.codec = codec.for_config(self.cfg.use_quantization)
        self.sync = SyncWorker(
            self.cfg, self.rank, plan, replica, self._loader, self.throttle_s, self, self.codec
        )
        metrics = Metrics(
            settings.metrics_dir,
            self.host,
            "worker",
            run_name(
                "worker",
                self.host,
                nn_cfg.learning_rate,
                nn_cfg.batch_size,
                self.cfg.num_workers,
                self.rank,
            ),
            self.cfg.wandb_mode,
            {"rank": self.rank, "host": self.host},
        )
        log.info("dataset: %s; shard of %d samples", plan.dataset, len(loader.indices))
        metrics.write(
            "start",
            role="worker",
            host=self.host,
            rank=self.rank,
            mode=self.cfg.mode,
            backend="socket",
            dataset=plan.dataset,
            workers=self.cfg.num_workers,
            total_steps=plan.total_steps,
        )
        failures = 0  # sessions in a row that ended without a step
        try:
            while True:
                conn = self.connect()
                conn.limit_payloads(
                    {
                        MsgType.START: 3 * replica.nbytes,
                        MsgType.AVERAGE: replica.nbytes,
                        MsgType.WEIGHTS: replica.nbytes,
                    }
                )
                # Before START the server may wait join_timeout_s for the others; a server
                # silent for longer than that and a step is gone.
                conn.idle_timeout = self.cfg.join_timeout_s + self.cfg.step_timeout_s + 30
                steps = self.steps
                try:
                    finished = self._session(conn, loader, replica, metrics)
                except Refused:
                    raise
                except ProtocolError as exc:  # lost, stalled past a deadline, or garbage
                    failures = 1 if self.steps > steps else failures + 1
                    delay = min(0.2 * 2 ** (failures - 1), self.cfg.connect_backoff_s)
                    log.warning("lost the server (%s); reconnecting in %.1f s", exc, delay)
                    time.sleep(delay)
                    continue
                finally:
                    self.bytes_sent += conn.bytes_sent
                    self.bytes_recv += conn.bytes_recv
                    conn.close()
                if finished:
                    break
        finally:
            metrics.write(
                "summary",
                role="worker",
                host=self.host,
                rank=self.rank,
                steps=self.steps,
                samples=self.samples,
                samples_per_s=round(self.samples / max(metrics.wall, 1e-9), 2),
                bytes_sent=self.bytes_sent,
                bytes_recv=self.bytes_recv,
            )
            metrics.close()
        return 0

    def _session(self, conn: Connection, loader, replica: Replica, metrics: Metrics) -> bool:
        """Train over one connection; True when the server said the run is done."""
        step = -1
        into = {MsgType.AVERAGE: self.sync.average_target()}
        while True:
            frame = conn.recv(into)
            if frame.type == MsgType.START and self.cfg.mode == "elastic":
                log.info("joined at global version %d", frame.meta["version"])
                conn.idle_timeout = self.cfg.step_timeout_s + 30
                session = ElasticSession(
                    conn, frame, self.cfg, loader, replica, self.throttle_s, self, self.codec
                )
                session.run(metrics)  # returns once the server says DONE
                conn.send(MsgType.BYE, {"reason": "run finished"})
                log.info("server finished the run")
                return True
            if frame.type == MsgType.START:
                # From here a reply that takes far longer than a step means a dead path.
                conn.idle_timeout = self.cfg.step_timeout_s + 30
                step = self.sync.start(frame)
                log.info("synchronized at step %d of %s", step, frame.meta.get("total_steps"))
            elif frame.type == MsgType.AVERAGE:
                last = self.sync.average(frame, step)
                step += 1
                if last:
                    continue  # DONE follows
            elif frame.type == MsgType.DONE:
                conn.send(MsgType.BYE, {"reason": "run finished"})
                log.info(
                    "server finished the run (test accuracy %s)", frame.meta.get("final_accuracy")
                )
                return True
            elif frame.type == MsgType.ERROR:
                raise Refused(f"server reported: {frame.meta.get('reason')}")
            else:
                raise ProtocolError(f"unexpected {frame.type.name}")
            self.sync.send_gradients(conn, step, metrics)

    def _loader(self, rank: int) -> ShardLoader:
        """The loader of a rank's shard: its own, or an absent worker's it covers (read from
        the training split on disk, which every host has, when first needed)."""
        if rank not in self._loaders:
            self._loaders[rank] = shard_loader(self.settings, rank)
        return self._loaders[rank]
