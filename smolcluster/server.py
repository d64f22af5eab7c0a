"""The parameter server: assembles a run from the hub (connections and membership), the
mode's loop (smolcluster.sync or smolcluster.elastic), checkpoints and the evaluator, then
writes the run's summary.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

from smolcluster import codec
from smolcluster.balance import Balancer
from smolcluster.checkpoint import Checkpointer, Progress
from smolcluster.config import Settings
from smolcluster.elastic import ElasticLoop, eval_interval
from smolcluster.evaluator import Evaluator
from smolcluster.hub import Hub, Terminated
from smolcluster.metrics import Metrics, run_name
from smolcluster.plan import Plan, load_test, make_plan, shard_loader, train_size
from smolcluster.protocol import MsgType, read_secret
from smolcluster.replica import Replica
from smolcluster.sync import SyncLoop

log = logging.getLogger("smolcluster")


class Server:
    """Assembles a run: the hub, the mode's loop, checkpoints and the evaluator."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.cluster
        self.hub = Hub(self.cfg, read_secret(settings.secret_path))
        self.progress = Progress()

    @property
    def checkpoint_path(self) -> Path:
        return self.settings.checkpoint_dir / f"{self.cfg.server}.pt"

    def run(self, resume: bool = False) -> int:
        settings, cfg, nn_cfg, hub = self.settings, self.cfg, self.settings.nn, self.hub
        x_test, y_test = load_test(settings)
        plan = make_plan(settings, train_size(settings))
        own = shard_loader(settings, 0) if cfg.server_trains else None
        replica = Replica.build(
            nn_cfg.model, nn_cfg.learning_rate, cfg.seed, nn_cfg.lr_schedule, nn_cfg.fused_adam
        )
        balancer = Balancer(nn_cfg.batch_size) if cfg.balance == "auto" else None
        checkpoints = Checkpointer(
            self.checkpoint_path,
            cfg.mode,
            cfg.checkpoint_every,
            replica,
            self.progress,
            hub,
            balancer.cursors if balancer is not None else None,
        )
        if resume:
            checkpoints.resume()
        name = run_name(
            "server", cfg.server, nn_cfg.learning_rate, nn_cfg.batch_size, cfg.num_workers
        )
        metrics = Metrics(
            settings.metrics_dir, cfg.server, "server", name, cfg.wandb_mode, _flat_config(settings)
        )
        elastic = cfg.mode == "elastic"
        every = eval_interval(cfg, nn_cfg.eval_steps) if elastic else nn_cfg.eval_steps
        evaluator = Evaluator(replica, x_test, y_test, metrics, plan, every)
        wire = codec.for_config(cfg.use_quantization)  # every send and receive of the run
        loop: ElasticLoop | SyncLoop
        if elastic:
            loop = ElasticLoop(hub, settings, plan, replica, self.progress, wire)
        else:
            loop = SyncLoop(hub, settings, plan, replica, self.progress, wire, balancer, own)
        self._announce(plan, metrics, resume)
        hub.on_change = lambda change, peer, reason: metrics.write(
            "member",
            host=peer.host,
            change=change,
            step=self.progress.step,
            workers=len(hub.active),
            **({"reason": reason} if reason else {}),
        )
        # Every part of the run waits through hub.next_event, which honours these at once.
        hub.payload_limits = {MsgType.GRADS: replica.nbytes, MsgType.PUSH: replica.nbytes}
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: hub.terminate.set())
        hub.listen()
        try:
            # Sync waits for everyone (or the timeout); elastic starts with the first
            # min_workers because anyone may join later at no cost to the others.
            hub.wait_for_workers(cfg.min_workers if elastic else cfg.num_workers)
            started, samples_before = time.monotonic(), self.progress.samples_merged
            loop.run(metrics, evaluator, checkpoints)
            trained_s = time.monotonic() - started
        except Terminated:
            checkpoints.save()
            log.warning(
                "stopped by SIGTERM/SIGINT at step %d; checkpoint saved", self.progress.step
            )
            metrics.close()
            return 0
        finally:
            hub.close()
        rate = (self.progress.samples_merged - samples_before) / trained_s if trained_s else 0.0
        self._finish(plan, replica, evaluator, checkpoints, metrics, rate)
        return 0

    def _announce(self, plan: Plan, metrics: Metrics, resume: bool) -> None:
        """The run's shape, in the log and as the metrics' start event."""
        cfg, nn_cfg = self.cfg, self.settings.nn
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
            resumed_at=self.progress.step if resume else None,
        )

    def _finish(
        self,
        plan: Plan,
        replica: Replica,
        evaluator: Evaluator,
        checkpoints: Checkpointer,
        metrics: Metrics,
        samples_per_s: float,
    ) -> None:
        """Save, tell every worker the run is done, write the summary (samples/s: this
        process's training time, from the first step to the last; joining not counted)."""
        settings, cfg, hub = self.settings, self.cfg, self.hub
        val_loss, accuracy = evaluator.last
        checkpoints.save()
        replica.save(settings.metrics_dir / f"{cfg.server}-model.pt")
        for peer in list(hub.active) + list(hub.pending):
            hub.send_to(peer, MsgType.DONE, {"final_accuracy": accuracy})
        hub.await_goodbyes()
        metrics.write(
            "summary",
            role="server",
            host=cfg.server,
            mode=cfg.mode,
            steps=self.progress.step,
            final_accuracy=accuracy,
            final_val_loss=val_loss,
            dataset=plan.dataset,
            samples=self.progress.samples_merged,
            samples_per_s=round(samples_per_s, 2),
            checksum_mismatches=self.progress.checksum_mismatches,
            bytes_sent=hub.bytes_sent,
            bytes_recv=hub.bytes_recv,
            workers=hub.per_host(),
        )
        metrics.close()
        log.info(
            "done: %d steps, test accuracy %.4f, test loss %.4f, %.1f samples/s",
            self.progress.step,
            accuracy,
            val_loss,
            samples_per_s,
        )


def _flat_config(settings: Settings) -> dict[str, Any]:
    return {**settings.cluster.model_dump(), **settings.nn.model_dump()}
