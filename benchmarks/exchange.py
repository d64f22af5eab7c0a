"""Exchange only: what averaging B bytes of fp32 across N processes costs, on the real code.

ours: the real `smolcluster server` and N `smolcluster worker` processes in sync fp32 mode, the
model sized so its gradients are about B bytes, one sample per batch so forward/backward is
small. A worker step minus its forward/backward (step_time_s - compute_s in its metrics) is
the exchange as the trainer does it: sending GRADS, the server's reader threads, collect,
sample-weighted average and fan-out, receiving AVERAGE, then the worker's optimizer step.
gloo: the same N processes call dist.all_reduce on B bytes and divide (an average), timed
per call. The bytes column is the model's real gradient size, used by both.
"""

from __future__ import annotations

import argparse
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

from benchmarks.common import REPO, median, per_step_bytes, percentile
from benchmarks.results import grad_bytes
from benchmarks.runs import socket_cluster
from smolcluster.harness import LOOPBACK, Processes, free_port_pair


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
        out, n, data_root, steps=warmup + iters + 1, batch_size=1, hidden=hidden
    )
    cluster.start()
    cluster.wait(300, check=True)
    steps = {w: cluster.events(w, "step") for w in cluster.workers}
    times = [
        s["step_time_s"] - s["compute_s"]
        for per in steps.values()
        for s in per
        if s["step"] > warmup + 1  # the first steps carry set-up and allocator growth
    ]
    first = steps[cluster.workers[0]]
    return {
        "kind": "ours",
        "n": n,
        "bytes": grad_bytes(hidden),
        "iters": len(times),
        "median_s": median(times),
        "p90_s": percentile(times, 90),
        "wire_ratio": per_step_bytes(first, "bytes_sent") / grad_bytes(hidden),
    }


def measure_gloo(n: int, nbytes: int, iters: int, work: Path, warmup: int = 5) -> dict[str, Any]:
    out = work / f"gloo-{n}-{nbytes}"
    ranks = Processes(
        out,
        env={
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        },
    )
    port = free_port_pair()
    for rank in range(n):
        ranks.start_process(
            f"rank{rank}",
            [
                sys.executable, "-m", "benchmarks.exchange", "--rank", str(rank), "--n", str(n),
                "--bytes", str(nbytes), "--iters", str(iters), "--warmup", str(warmup),
                "--port", str(port), "--out", str(out / "times.json"),
            ],
        )  # fmt: skip
    ranks.wait(300, check=True)
    times = json.loads((out / "times.json").read_text())
    return {
        "kind": "gloo",
        "n": n,
        "bytes": nbytes,
        "iters": len(times),
        "median_s": median(times),
        "p90_s": percentile(times, 90),
    }


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
    }


def gloo_rank(a: argparse.Namespace) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{LOOPBACK}:{a.port}",
        rank=a.rank,
        world_size=a.n,
        timeout=timedelta(seconds=120),
    )
    tensor = torch.ones(a.bytes // 4)
    times = []
    for i in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        dist.all_reduce(tensor)
        tensor.div_(a.n)  # an average, like ours
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    dist.barrier()
    dist.destroy_process_group()
    if a.rank == 0:
        Path(a.out).write_text(json.dumps(times))


def main(argv: list[str] | None = None) -> int:
    """One gloo rank of measure_gloo (the harness starts N of them)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.exchange")
    for flag in ("--rank", "--n", "--bytes", "--iters", "--warmup", "--port"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--out", required=True)
    gloo_rank(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
