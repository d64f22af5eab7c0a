"""Exchange only: what averaging B bytes of fp32 across N processes costs, on the real code.

ours: a real `smolcluster server` and N workers whose model has about B bytes of gradients
(batch 1, so their step is small), timed at the server by its step events' `exchange_s`
(`SyncLoop.exchange`: gradients asked for to the last AVERAGE sent, the Adam step not) and at
the workers (`wait_s`, what a rank spends inside all_reduce). gloo: the same N processes call
dist.all_reduce on B bytes and divide. docs/benchmarks.md says what each column includes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from argparse import Namespace
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import code_env, fmt, median, per_step_bytes, percentile, table
from benchmarks.runs import grad_bytes, socket_cluster
from smolcluster.harness import LOOPBACK, SERVER, Processes, free_port_pair

N = 3  # processes in benchmarks.run's exchange part


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
    cluster = socket_cluster(work / f"ours-{n}-{nbytes}", n, data_root, steps=warmup + iters,
                             batch_size=1, hidden=hidden)  # fmt: skip
    cluster.start()
    cluster.wait(300, check=True)
    times = [e["exchange_s"] for e in cluster.events(SERVER, "step")[warmup:]]
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


def measure_row(n: int, nbytes: int, iters: int, work: Path, data_root: Path) -> dict[str, Any]:
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


def measure(a: Namespace, work: Path) -> list[dict[str, Any]]:
    """The exchange part of benchmarks.run: a row per --exchange-bytes, at N=3."""
    rows = []
    for nbytes in a.exchange_bytes:
        print(f"  exchange microbenchmark: {nbytes:,} B at N={N}", flush=True)
        rows.append(measure_row(N, nbytes, a.exchange_iters, work, a.data_root))
    return rows


def report(rows: list[dict[str, Any]], a: Namespace) -> str:
    ms = [[1e3 * r[k][q] for k in ("ours", "gloo") for q in ("median_s", "p90_s")] for r in rows]
    cells = [[f"{r['bytes']:,}", str(r["n"]),
              *(fmt(v, ".2f") for v in (*m, r["ratio"], 1e3 * r["ours"]["wait_median_s"],
                                        r["wait_ratio"]))]
             for r, m in zip(rows, ms, strict=True)]  # fmt: skip
    closest = [f"\nno SimpleNN has {b:,} B of gradients; measured the closest, {r['bytes']:,} B"
               for b, r in zip(a.exchange_bytes, rows, strict=True)
               if abs(r["bytes"] - b) > b / 20]  # fmt: skip
    return (
        f"## Exchange only: average B bytes of fp32 across N={N} processes\n\n"
        + table("bytes|N|ours ms p50|ours ms p90|gloo ms p50|gloo ms p90|ours ÷ gloo"
                "|worker wait ms p50|wait ÷ gloo", cells)
        + "".join(closest)
    )  # fmt: skip


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
    """One gloo rank of this benchmark: `gloo JSON` (JSON holds gloo_rank's arguments)."""
    _, spec = sys.argv[1:] if argv is None else argv
    gloo_rank(**json.loads(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
