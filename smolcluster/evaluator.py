"""The server's test-split evaluation, every `every` steps and at the end."""

from __future__ import annotations

import logging

import torch

from smolcluster.data import evaluate
from smolcluster.metrics import Metrics
from smolcluster.plan import Plan
from smolcluster.replica import Replica

log = logging.getLogger("smolcluster")


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
