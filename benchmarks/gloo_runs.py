"""Mode (d): torch.distributed DDP over gloo, N training ranks on loopback.

N ranks all train (rank 0 also evaluates), matching N socket workers each stepping one batch:
the same samples per step, the same model and optimizer, the same seeded shards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from benchmarks.common import (
    LOOPBACK,
    ProcessGroup,
    child_env,
    cpu_marks,
    free_port_pair,
    python,
    step_counter,
)
from benchmarks.results import RunResult, summarize_gloo


def run_gloo(
    n: int,
    steps: int,
    batch_size: int,
    data_root: Path,
    out: Path,
    *,
    epochs: int = 1,
    eval_steps: int = 1_000_000,
    threads: int = 1,
    timeout: float = 600.0,
    master_addr: str = LOOPBACK,
    ifname: str | None = None,
    launch: Callable[[str], list[str]] | None = None,
) -> RunResult:
    """`launch(host)` is an argv prefix per rank's host name (benchmarks/links.py runs each rank
    in its own network namespace, with master_addr = rank 0's address, ifname its veth)."""
    port = free_port_pair()
    hosts = [f"rank{r}" for r in range(n)]
    metrics = out / "metrics"
    group = ProcessGroup(out / "logs", child_env(threads))
    for rank in range(n):
        group.start(
            hosts[rank],
            [
                *(launch(hosts[rank]) if launch else []),
                python(),
                "-m",
                "smolcluster.gloo_backend",
                "--master-addr",
                master_addr,
                "--port",
                str(port),
                "--world-size",
                str(n),
                "--rank",
                str(rank),
                "--hosts",
                *hosts,
                "--batch-size",
                str(batch_size),
                "--epochs",
                str(epochs),
                "--eval-steps",
                str(eval_steps),
                "--max-steps",
                str(steps),
                "--data-root",
                str(data_root),
                "--metrics-dir",
                str(metrics),
                *(["--ifname", ifname] if ifname else []),
            ],
        )
    group.check(group.wait(timeout, step_counter(metrics / f"{hosts[0]}.jsonl"), cpu_marks(steps)))
    result = summarize_gloo(n, batch_size, metrics, hosts)
    result.cpu_ms_per_step = 1e3 * group.cpu.per_step()
    return result
