"""Exchange only: what averaging B bytes of fp32 across N processes costs, on the real code.

ours: the trainer's own sync exchange, `SyncLoop.exchange(step)` on a `Hub` (smolcluster/sync.py,
hub.py; driven here as docs/architecture.md shows, without the rest of a `Server`), against N
real `smolcluster worker` processes with the model sized so its gradients are about B bytes
and one sample per batch so their forward/backward is small. Timed per step at the server:
from asking for the step's gradients to the last AVERAGE sent (the server's reader threads,
queue, collect, sample-weighted average and fan-out; the workers' batch-1 step between two
exchanges included, the server's own optimizer step not). And at the workers: the median
`wait_s`, gradients sent to the next step begun, which is what a rank spends inside all_reduce
(plus the worker's own fused Adam step, well under a millisecond at 1.36 MB).
gloo: the same N processes call dist.all_reduce on B bytes and divide (an average), timed
per call. The bytes column is the model's real gradient size, used by both.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import code_env, median, per_step_bytes, percentile
from benchmarks.runs import grad_bytes, socket_cluster
from smolcluster import codec
from smolcluster.checkpoint import Progress
from smolcluster.config import load_settings
from smolcluster.harness import LOOPBACK, SERVER, Processes, free_port_pair
from smolcluster.hub import Hub
from smolcluster.plan import make_plan, train_size
from smolcluster.protocol import MsgType, read_secret
from smolcluster.replica import Replica
from smolcluster.sync import SyncLoop


@cache
def hidden_for(nbytes: int) -> int:
    """The SimpleNN hidden width whose fp32 gradients come closest to `nbytes` (bisection:
    the size grows with the width)."""
    lo, hi = 1, 4096
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if grad_bytes(mid) < nbytes else (lo, mid)
    return min({max(1, lo - 1), lo}, key=lambda h: abs(grad_bytes(h) - nbytes))


def measure_ours(
    n: int, nbytes: int, iters: int, work: Path, data_root: Path, warmup: int = 5
) -> dict[str, Any]:
    hidden = hidden_for(nbytes)
    out = work / f"ours-{n}-{nbytes}"
    cluster = socket_cluster(
        out, n, data_root, steps=warmup + iters, batch_size=1, hidden=hidden, env=code_env()
    )
    argv = [sys.executable, "-m", "benchmarks.exchange", "drive", str(cluster.cluster_file)]
    cluster.start_process(SERVER, [*argv, str(cluster.nn_file), str(out / "times.json")])
    for host in cluster.workers:
        cluster.spawn(host, "worker", "--host", host)
    cluster.wait(300, check=True)
    times = json.loads((out / "times.json").read_text())[warmup:]
    first = cluster.events(cluster.workers[0], "step")
    wire_ratio = per_step_bytes(first, "bytes_sent") / grad_bytes(hidden)
    # What a worker is blocked on, as a rank is in all_reduce: its gradients sent to its next
    # step begun (the average's round trip plus its own fused Adam step).
    waits = [e["wait_s"] for h in cluster.workers for e in cluster.events(h, "step")[warmup:]
             if e.get("wait_s") is not None]  # fmt: skip
    return {**_timing("ours", n, grad_bytes(hidden), times), "wire_ratio": wire_ratio,
            "wait_median_s": median(waits)}  # fmt: skip


def _timing(kind: str, n: int, nbytes: int, times: list[float]) -> dict[str, Any]:
    return {"kind": kind, "n": n, "bytes": nbytes, "iters": len(times),
            "median_s": median(times), "p90_s": percentile(times, 90)}  # fmt: skip


def drive_server(cluster_file: str, nn_file: str, out: str) -> None:
    """The server end of measure_ours: a Hub and the SyncLoop, each exchange timed."""
    settings = load_settings(cluster_file, nn_file)
    cfg = settings.cluster
    plan = make_plan(settings, train_size(settings))
    nn = settings.nn
    replica = Replica.build(nn.model, nn.learning_rate, cfg.seed, nn.lr_schedule)
    hub = Hub(cfg, read_secret(settings.secret_path))
    hub.payload_limits = {MsgType.GRADS: replica.nbytes}
    hub.listen()
    hub.wait_for_workers(cfg.num_workers)
    loop = SyncLoop(hub, settings, plan, replica, Progress(), codec.for_config(False))
    times = []
    for step in range(plan.total_steps):
        started = time.perf_counter()
        if loop.exchange(step) is None:
            raise SystemExit(f"no worker answered step {step}")
        times.append(time.perf_counter() - started)
        replica.step(step / plan.total_steps)  # as the run does: the workers check it
    hub.close()
    for peer in list(hub.active):
        hub.send_to(peer, MsgType.DONE, {})
    hub.await_goodbyes()
    Path(out).write_text(json.dumps(times))


def measure_gloo(n: int, nbytes: int, iters: int, work: Path, warmup: int = 5) -> dict[str, Any]:
    out = work / f"gloo-{n}-{nbytes}"
    ranks = Processes(out, env=code_env())  # children: `python -m benchmarks.exchange`
    port = free_port_pair()
    for rank in range(n):
        spec = {"rank": rank, "n": n, "nbytes": nbytes, "iters": iters, "warmup": warmup,
                "port": port, "out": str(out / "times.json")}  # fmt: skip
        argv = [sys.executable, "-m", "benchmarks.exchange", "gloo", json.dumps(spec)]
        ranks.start_process(f"rank{rank}", argv)
    ranks.wait(300, check=True)
    return _timing("gloo", n, nbytes, json.loads((out / "times.json").read_text()))


def measure(n: int, nbytes: int, iters: int, work: Path, data_root: Path) -> dict[str, Any]:
    """One row of the exchange table: both sides at the model's real gradient size."""
    ours = measure_ours(n, nbytes, iters, work, data_root)
    gloo = measure_gloo(n, ours["bytes"], iters, work)
    return {
        "bytes": ours["bytes"],
        "n": n,
        "ours": ours,
        "gloo": gloo,
        "ratio": ours["median_s"] / gloo["median_s"],
        "wait_ratio": ours["wait_median_s"] / gloo["median_s"],
    }


def gloo_rank(rank: int, n: int, nbytes: int, iters: int, warmup: int, port: int, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{LOOPBACK}:{port}",
        rank=rank,
        world_size=n,
        timeout=timedelta(seconds=120),
    )
    tensor = torch.ones(nbytes // 4)
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        dist.all_reduce(tensor)
        tensor.div_(n)  # an average, like ours
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(times))


def main(argv: list[str] | None = None) -> int:
    """A child of this benchmark: `drive CLUSTER_YAML NN_YAML OUT` (the server end) or
    `gloo JSON` (one rank; JSON holds gloo_rank's arguments)."""
    kind, *args = sys.argv[1:] if argv is None else argv
    if kind == "drive":
        drive_server(*args)
    else:
        gloo_rank(**json.loads(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
