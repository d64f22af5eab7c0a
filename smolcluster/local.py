"""The one-process baseline: the same model, data and steps as a sync run, on one machine.

Each step trains on the concatenation of the batches every shard would contribute in a sync
run. The gradient of that concatenated batch is accumulated shard by shard and summed in rank
order, exactly as the server averages, so a sync run and this baseline round alike and end
with the same weights (see Replica.average_into_grads for why the order matters).
"""

from __future__ import annotations

import logging

from smolcluster.config import Settings
from smolcluster.data import evaluate
from smolcluster.metrics import Metrics, run_name
from smolcluster.plan import load_test, make_plan, shard_count, shard_loader, train_size
from smolcluster.replica import Replica

log = logging.getLogger("smolcluster")


def train_local(settings: Settings, host: str = "local") -> tuple[Replica, float]:
    cfg, nn_cfg = settings.cluster, settings.nn
    x_test, y_test = load_test(settings)
    plan = make_plan(settings, train_size(settings))
    first_rank = 0 if cfg.server_trains else 1
    loaders = [
        shard_loader(settings, rank)
        for rank in range(first_rank, first_rank + shard_count(settings))
    ]
    replica = Replica.build(
        nn_cfg.model, nn_cfg.learning_rate, cfg.seed, nn_cfg.lr_schedule, nn_cfg.fused_adam
    )
    metrics = Metrics(
        settings.metrics_dir,
        host,
        "local",
        run_name("local", host, nn_cfg.learning_rate, nn_cfg.batch_size, len(loaders)),
        cfg.wandb_mode,
        {**cfg.model_dump(), **nn_cfg.model_dump()},
    )
    log.info("dataset: %s", plan.dataset)
    metrics.write(
        "start",
        role="local",
        host=host,
        mode="local",
        backend="none",
        dataset=plan.dataset,
        workers=len(loaders),
        total_steps=plan.total_steps,
    )
    accuracy = val_loss = float("nan")
    for step in range(plan.total_steps):
        epoch, i = plan.position(step)
        parts, loss_sum = [], 0.0
        for loader in loaders:
            xb, yb = loader.batch(epoch, i)
            loss_sum += replica.compute_gradients(xb, yb) * len(yb)
            parts.append((len(yb), replica.grads.clone()))
        samples = replica.average_into_grads(parts)
        loss = loss_sum / samples
        replica.step(step / plan.total_steps)
        metrics.write("step", step=step + 1, epoch=epoch, loss=loss, samples=samples)
        if (step + 1) % nn_cfg.eval_steps == 0 or step + 1 == plan.total_steps:
            val_loss, accuracy = evaluate(replica.model, x_test, y_test)
            metrics.write(
                "eval", step=step + 1, epoch=epoch, val_loss=val_loss, val_accuracy=accuracy
            )
            log.info(
                "step %d/%d  loss %.4f  test loss %.4f  test accuracy %.4f",
                step + 1,
                plan.total_steps,
                loss,
                val_loss,
                accuracy,
            )
    metrics.write(
        "summary",
        role="local",
        host=host,
        steps=plan.total_steps,
        final_accuracy=accuracy,
        final_val_loss=val_loss,
        dataset=plan.dataset,
    )
    metrics.close()
    replica.save(settings.metrics_dir / f"{host}-model.pt")
    return replica, accuracy
