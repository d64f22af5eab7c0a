"""`backend: gloo`: the same training job on torch.distributed DDP instead of our socket protocol.

For users who want the stock engine, and as the yardstick in benchmarks/. Rank 0 is the server
host; unlike socket mode it trains its own shard too, because DDP needs every rank to step.
Same model, data partition, optimizer and metrics JSONL as the socket trainer, so the watcher and
the report read either. MASTER_PORT is the cluster port + 1, leaving the socket port free.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from smolcluster.metrics import Metrics, run_name, setup_logging, wandb_mode
from smolcluster.model import build_model
from smolcluster.replica import adam, scheduled_lr

log = logging.getLogger("smolcluster.gloo")


@dataclass
class GlooRun:
    """Everything one gloo rank needs; built from the two configs or given by hand."""

    master_addr: str  # the server's cluster address, as this rank reaches it
    port: int  # the smolcluster socket port; gloo's rendezvous uses port + 1
    world_size: int  # server + workers
    rank: int  # 0 = server
    hosts: list[str]  # host name of every rank, index = rank (names the metrics files)
    batch_size: int
    lr: float
    epochs: int
    eval_steps: int
    data_root: Path
    metrics_dir: Path
    seed: int = 42
    max_steps: int | None = None
    ifname: str | None = None
    model: dict[str, Any] = field(
        default_factory=lambda: {"type": "SimpleNN", "input_dim": 784, "hidden": 128, "out": 10}
    )
    timeout_s: float = 300.0
    track_gradients: bool = False
    wandb_mode: str = "disabled"
    lr_schedule: str = "constant"
    fused_adam: bool = True

    @property
    def host(self) -> str:
        return self.hosts[self.rank]


def run_from_settings(settings: Any, role: str, rank: int, host: str) -> NoReturn:
    """`smolcluster server/worker` with `backend: gloo`; settings is a config.Settings. Ends
    the process with the run's status (exit_now) instead of returning."""
    cluster, nncfg = settings.cluster, settings.nn
    hosts = [cluster.server, *cluster.workers]
    if role == "server":
        rank, host = 0, cluster.server
    elif hosts[rank] != host:
        raise ValueError(f"rank {rank} is {hosts[rank]!r} in the cluster config, not {host!r}")
    run = GlooRun(
        master_addr=cluster.host_ip[host],
        port=cluster.port,
        world_size=len(hosts),
        rank=rank,
        hosts=hosts,
        batch_size=nncfg.batch_size,
        lr=nncfg.learning_rate,
        epochs=nncfg.num_epochs,
        eval_steps=nncfg.eval_steps,
        data_root=settings.data_root,
        metrics_dir=settings.metrics_dir,
        seed=cluster.seed,
        max_steps=nncfg.max_steps,
        ifname=cluster.gloo_ifname,
        model=nncfg.model.model_dump(),
        timeout_s=max(cluster.join_timeout_s, cluster.step_timeout_s),
        track_gradients=nncfg.track_gradients,
        wandb_mode=cluster.wandb_mode,
        lr_schedule=nncfg.lr_schedule,
        fused_adam=nncfg.fused_adam,
    )
    exit_now(run_gloo(run))


def gloo_ifname(run: GlooRun) -> str | None:
    """The interface gloo should bind: the configured one, else loopback for a loopback master."""
    if run.ifname:
        return run.ifname
    try:
        loopback = ipaddress.ip_address(run.master_addr).is_loopback
    except ValueError:
        loopback = run.master_addr == "localhost"
    if loopback:
        return "lo0" if sys.platform == "darwin" else "lo"
    return None  # gloo resolves this host's name; the inventory should set gloo_ifname


class _IoBytes:
    """Socket bytes this process sent, from /proc/self/io (gloo sends with writev -> wchar).

    wchar counts every write, so the metrics file's growth is subtracted; log lines (a few
    hundred bytes per eval) are not. With W&B on, the SDK's own socket writes would count too,
    and where /proc is missing (macOS) there is nothing to read: both fall back to the ring
    all-reduce's exact volume, 2 (N-1)/N x gradient bytes per step. gloo receives with recv(2),
    which rchar does not count; an all-reduce receives what it sends on every rank.
    """

    def __init__(self, metrics_file: Path, grad_bytes: int, world: int, measure: bool) -> None:
        self._file = metrics_file
        self._estimate = int(2 * (world - 1) / world * grad_bytes) if world > 1 else 0
        self._base = self._wchar() if measure else None
        self._base_file = self._file_size()
        self.source = "proc_io" if self._base is not None else "ring_estimate"
        self._steps = 0

    @staticmethod
    def _wchar() -> int | None:
        try:
            for line in Path("/proc/self/io").read_text().splitlines():
                if line.startswith("wchar:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def _file_size(self) -> int:
        try:
            return self._file.stat().st_size
        except OSError:
            return 0

    def step(self) -> None:
        self._steps += 1

    def totals(self) -> tuple[int, int]:
        now = self._wchar() if self._base is not None else None
        if now is None or self._base is None:
            sent = self._estimate * self._steps
        else:
            own = self._file_size() - self._base_file
            sent = max(0, now - self._base - own)
        return sent, sent


class _CommTimer:
    """DDP comm hook that times the all-reduce: first bucket launched to last bucket done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.first: float | None = None
            self.last: float | None = None

    def seconds(self) -> float:
        with self._lock:
            if self.first is None or self.last is None:
                return 0.0
            return self.last - self.first

    # Unannotated on purpose: DDP compares the annotations with dist.GradBucket, and
    # `from __future__ import annotations` turns them into strings that fail that check.
    def hook(self, _state, bucket):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        with self._lock:
            self.first = start if self.first is None else self.first
        tensor = bucket.buffer()
        tensor.div_(dist.get_world_size())
        fut = dist.all_reduce(tensor, async_op=True).get_future()

        def done(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            end = time.perf_counter()
            with self._lock:
                self.last = end if self.last is None else max(self.last, end)
            return f.value()[0]

        return fut.then(done)


def param_digest(model: nn.Module) -> str:
    """sha256 of all parameters' bytes in order: equal digests mean bit-identical replicas."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _grad_norms(model: nn.Module) -> dict[str, float]:
    return {
        name: float(p.grad.norm()) for name, p in model.named_parameters() if p.grad is not None
    }


def exit_now(status: int) -> NoReturn:
    """End a rank's process without interpreter finalization. Even after
    destroy_process_group, a thread of torch's gloo stack can still be joinable when C++ tears
    down at exit, which aborts the process ("terminate called without an active exception",
    SIGABRT with no Python frame: about 1 run in 50 of three ranks here, and once in CI) after
    the run has succeeded. Everything of ours is closed by now; flush what is buffered."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_gloo(run: GlooRun) -> int:
    """Train this rank to the end of the run; returns the process exit status."""
    from smolcluster import data  # the data helper's module; imported late to keep CLI start fast

    ifname = gloo_ifname(run)
    if ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    role = "server" if run.rank == 0 else "worker"
    log.info(
        "gloo rank %d/%d (%s): rendezvous tcp://%s:%d ifname=%s",
        run.rank,
        run.world_size,
        run.host,
        run.master_addr,
        run.port + 1,
        ifname or "(hostname)",
    )
    dist.init_process_group(
        backend="gloo",
        init_method=f"tcp://{run.master_addr}:{run.port + 1}",
        world_size=run.world_size,
        rank=run.rank,
        timeout=timedelta(seconds=run.timeout_s),
    )
    try:
        return _train(run, role, data)
    finally:
        dist.destroy_process_group()


def _train(run: GlooRun, role: str, data: Any) -> int:
    m = run.model
    metrics = Metrics(
        run.metrics_dir,
        run.host,
        role,
        run_name(role, run.host, run.lr, run.batch_size, run.world_size - 1, run.rank),
        run.wandb_mode,
        {
            "backend": "gloo",
            "lr": run.lr,
            "batch_size": run.batch_size,
            "world_size": run.world_size,
            "seed": run.seed,
            "model": m,
        },
    )
    try:
        return _train_loop(run, role, data, metrics)
    finally:
        metrics.close()


def _train_loop(run: GlooRun, role: str, data: Any, metrics: Metrics) -> int:
    x_test, y_test = data.read_rows(run.data_root, False)  # uint8; evaluate converts per batch
    shards = data.partition(data.split_size(run.data_root, True), run.world_size, run.seed)
    loader = data.ShardLoader.read(
        run.data_root, shards[run.rank], run.batch_size, run.seed, run.rank
    )
    m = run.model
    model = build_model(m["type"], m["input_dim"], m["hidden"], m["out"], run.seed)
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
    timer = _CommTimer()
    ddp.register_comm_hook(None, timer.hook)
    # The same Adam kernel as smolcluster.replica's (nn.fused_adam).
    optimizer = adam(list(ddp.parameters()), run.lr, run.fused_adam)
    loss_fn = nn.CrossEntropyLoss()

    # Every rank must take the same number of steps or DDP deadlocks: agree on the shortest shard.
    steps = torch.tensor([loader.steps_per_epoch], dtype=torch.int64)
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    steps_per_epoch = int(steps.item())
    total = steps_per_epoch * run.epochs
    if run.max_steps is not None:
        total = min(total, run.max_steps)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    dataset = data.dataset_info(run.data_root).source
    metrics.write(
        "start",
        role=role,
        host=run.host,
        mode="sync",
        backend="gloo",
        dataset=dataset,
        workers=run.world_size - 1,
        total_steps=total,
        rank=run.rank,
        world_size=run.world_size,
        batch_size=run.batch_size,
        grad_bytes=grad_bytes,
    )
    log.info(
        "dataset: %s; training %d steps (%d per epoch) on %d samples",
        dataset,
        total,
        steps_per_epoch,
        len(shards[run.rank]),
    )
    io = _IoBytes(
        metrics.path, grad_bytes, run.world_size, measure=wandb_mode(run.wandb_mode) == "disabled"
    )

    last_eval: dict[str, float] = {}

    def evaluate(step: int, epoch: int) -> None:
        loss, acc = data.evaluate(model, x_test, y_test)
        last_eval.update(val_loss=float(loss), val_accuracy=float(acc))
        metrics.write("eval", step=step, epoch=epoch, val_loss=float(loss), val_accuracy=float(acc))
        log.info("step %d: val_loss %.4f val_accuracy %.4f", step, loss, acc)

    step = 0
    samples = 0
    epoch = 0
    train_start = time.perf_counter()
    for epoch in range(run.epochs):
        if step >= total:
            break
        for i, (xb, yb) in enumerate(loader.epoch_batches(epoch)):
            if i >= steps_per_epoch or step >= total:
                break
            t0 = time.perf_counter()
            timer.reset()
            optimizer.zero_grad(set_to_none=False)
            loss = loss_fn(ddp(xb), yb)
            loss.backward()  # DDP all-reduces (averages) the gradients before this returns
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(run.lr, run.lr_schedule, step / total)
            optimizer.step()
            step_s = time.perf_counter() - t0
            step += 1
            samples += len(xb)
            io.step()
            sent, recv = io.totals()
            fields: dict[str, Any] = {
                "step": step,
                "epoch": epoch,
                "loss": loss.item(),
                # Cluster throughput: every rank stepped a batch of this size.
                "samples_per_s": run.world_size * len(xb) / step_s if step_s > 0 else 0.0,
                "bytes_sent": sent,
                "bytes_recv": recv,
                "step_time_s": step_s,
                "comm_s": timer.seconds(),
            }
            if run.track_gradients:
                fields["grad_norms"] = _grad_norms(model)
            metrics.write("step", **fields)
            if run.rank == 0 and step % run.eval_steps == 0:
                evaluate(step, epoch)
    train_s = time.perf_counter() - train_start
    if run.rank == 0 and (not last_eval or step % run.eval_steps != 0):
        evaluate(step, epoch)

    sent, recv = io.totals()  # before the check below, whose all-reduces are not training
    digest = param_digest(model)
    identical = _replicas_identical(model)
    # Rank 0's summary lists every rank: [steps, samples, sent, recv, seconds] gathered as floats.
    mine = torch.tensor([step, samples, sent, recv, train_s], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(run.world_size)]
    dist.all_gather(gathered, mine)
    summary: dict[str, Any] = {
        "role": role,
        "host": run.host,
        "backend": "gloo",
        "steps": step,
        "samples": samples,
        "samples_per_s": samples / train_s if train_s > 0 else 0.0,
        "bytes_sent": sent,
        "bytes_recv": recv,
        "bytes_source": io.source,
        "param_sha256": digest,
        "replicas_identical": identical,
        "dataset": dataset,
        # Socket mode counts checksum mismatches; here one bitwise check at the end.
        "checksum_mismatches": 0 if identical else 1,
    }
    if run.rank == 0:
        # The trained weights, where the socket server leaves them too.
        torch.save(model.state_dict(), run.metrics_dir / f"{run.host}-model.pt")
        cluster_samples = sum(int(g[1]) for g in gathered)
        summary.update(
            final_accuracy=last_eval["val_accuracy"],
            final_val_loss=last_eval["val_loss"],
            cluster_samples=cluster_samples,
            cluster_samples_per_s=cluster_samples / train_s if train_s > 0 else 0.0,
            workers={
                run.hosts[r]: {
                    "steps": int(g[0]),
                    "samples": int(g[1]),
                    "bytes_sent": int(g[2]),
                    "bytes_recv": int(g[3]),
                    "seconds": round(float(g[4]), 4),
                }
                for r, g in enumerate(gathered)
                if r != 0
            },
        )
    metrics.write("summary", **summary)
    if not identical:
        log.error("replicas diverged: parameters differ across ranks")
        return 1
    log.info("done: %d steps, %d samples, %.1f samples/s", step, samples, summary["samples_per_s"])
    return 0


def _replicas_identical(model: nn.Module) -> bool:
    """Compare every rank's parameters bit for bit (max and min of a flat int view all-reduced)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).view(torch.int32)
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))


def main(argv: list[str] | None = None) -> int:
    """`python -m smolcluster.gloo_backend`: one rank from plain arguments (benchmarks, tests)."""
    p = argparse.ArgumentParser(prog="python -m smolcluster.gloo_backend")
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--hosts", nargs="+", help="host name per rank (default rank0 rank1 ...)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--eval-steps", type=int, default=200)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--metrics-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--ifname")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--wandb", default="disabled", choices=["auto", "online", "offline", "disabled"])
    a = p.parse_args(argv)
    hosts = a.hosts or [f"rank{r}" for r in range(a.world_size)]
    if len(hosts) != a.world_size:
        p.error("--hosts needs one name per rank")
    setup_logging(hosts[a.rank], "server" if a.rank == 0 else "worker")
    return run_gloo(
        GlooRun(
            master_addr=a.master_addr,
            port=a.port,
            world_size=a.world_size,
            rank=a.rank,
            hosts=hosts,
            batch_size=a.batch_size,
            lr=a.lr,
            epochs=a.epochs,
            eval_steps=a.eval_steps,
            data_root=a.data_root,
            metrics_dir=a.metrics_dir,
            seed=a.seed,
            max_steps=a.max_steps,
            ifname=a.ifname,
            wandb_mode=a.wandb,
            model={"type": "SimpleNN", "input_dim": 784, "hidden": a.hidden, "out": 10},
        )
    )


if __name__ == "__main__":
    exit_now(main())
