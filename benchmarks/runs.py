"""One benchmark run of each kind, through the shared harness (smolcluster/harness.py).

Socket modes (a)-(c): the real `smolcluster server` + N `smolcluster worker` processes.
Mode (d): N `python -m smolcluster.gloo_backend` DDP ranks that all train (rank 0 also
evaluates), matching N socket workers each stepping one batch: the same samples per step, the
same model and optimizer, the same seeded shards. Numbers come from the JSONL metrics the
processes write (the same files the Ansible report reads).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import CpuWindow, cpu_marks
from benchmarks.results import RunResult, summarize_elastic, summarize_gloo, summarize_socket
from smolcluster.harness import LOOPBACK, SERVER, GlooRanks, LocalCluster, count_events

EVAL_NEVER = 1_000_000  # eval_steps: only the final evaluation


def socket_cluster(
    out: Path,
    n: int,
    data_root: Path,
    *,
    steps: int,
    batch_size: int = 32,
    hidden: int = 128,
    epochs: int = 1,
    eval_steps: int = EVAL_NEVER,
    threads: int = 1,
    extra: dict[str, Any] | None = None,
    launch: Callable[[str], list[str]] | None = None,
    env: dict[str, str] | None = None,
) -> LocalCluster:
    """The configured (not yet started) cluster; `extra` adds or overrides cluster-config keys
    (mode, use_quantization, server_lr, throttle_s, ...). `launch(host)` is an argv prefix per
    host (benchmarks/links.py: `ip netns exec <ns>`, with host_ip and bind_address in `extra`);
    default: plain processes on loopback."""
    return LocalCluster(
        out,
        data_root,
        n,
        cluster={
            "torch_threads": threads,
            "connect_backoff_s": 0.2,
            "step_timeout_s": 120.0,
            **(extra or {}),
        },
        nn={
            "batch_size": batch_size,
            "num_epochs": epochs,
            "eval_steps": eval_steps,
            "max_steps": steps,
            "model": {"type": "SimpleNN", "input_dim": 784, "hidden": hidden, "out": 10},
            "dataset": {"name": "MNIST", "root": str(data_root), "download": False},
        },
        launch=launch,
        env=env,
    )


def run_socket(
    label: str,
    n: int,
    steps: int,
    batch_size: int,
    data_root: Path,
    out: Path,
    *,
    quantize: bool = False,
    mode: str = "sync",
    update_interval: int = 50,
    timeout: float = 600.0,
    extra: dict[str, Any] | None = None,
    **options: Any,
) -> RunResult:
    """One run; `options` go to socket_cluster (epochs, eval_steps, threads, launch)."""
    cluster = socket_cluster(
        out,
        n,
        data_root,
        steps=steps,
        batch_size=batch_size,
        extra={
            "mode": mode,
            "use_quantization": quantize,
            "worker_update_interval": update_interval,
            # All N from the first step, as in sync: else, on a loaded machine, a late
            # starter can find an elastic run already over.
            "min_workers": n,
            **(extra or {}),
        },
        **options,
    )
    # Elastic: the server logs one step event per merged push, steps * n / K of them.
    merges = steps * n // update_interval
    marks = (1, max(2, merges - 1)) if mode == "elastic" else cpu_marks(steps)
    cpu = CpuWindow(lambda: count_events(cluster.metrics_dir / f"{SERVER}.jsonl", "step"), marks)
    cluster.start()
    cluster.wait(timeout, poll=lambda: cpu.poll(cluster.pids()), check=True)
    if mode == "elastic":
        result = summarize_elastic(label, n, batch_size, update_interval, cluster)
        # CPU per cluster step (n workers x one local step), comparable with sync rows.
        result.cpu_ms_per_step = 1e3 * cpu.per_step() * n / update_interval
    else:
        result = summarize_socket(label, n, batch_size, cluster)
        result.cpu_ms_per_step = 1e3 * cpu.per_step()
    return result


def run_gloo(
    n: int,
    steps: int,
    batch_size: int,
    data_root: Path,
    out: Path,
    *,
    epochs: int = 1,
    eval_steps: int = EVAL_NEVER,
    threads: int = 1,
    timeout: float = 600.0,
    master_addr: str = LOOPBACK,
    ifname: str | None = None,
    launch: Callable[[str], list[str]] | None = None,
) -> RunResult:
    """`launch(host)` is an argv prefix per rank's name (benchmarks/links.py runs each rank
    in its own network namespace, with master_addr = rank 0's address, ifname its veth)."""
    ranks = GlooRanks(out, n, threads, launch)
    ranks.start(
        data_root,
        "--batch-size", str(batch_size), "--epochs", str(epochs),
        "--eval-steps", str(eval_steps), "--max-steps", str(steps),
        *(["--ifname", ifname] if ifname else []),
        master_addr=master_addr,
    )  # fmt: skip
    cpu = CpuWindow(
        lambda: count_events(ranks.metrics_dir / "rank0.jsonl", "step"), cpu_marks(steps)
    )
    ranks.wait(timeout, poll=lambda: cpu.poll(ranks.pids()), check=True)
    result = summarize_gloo(n, batch_size, ranks)
    result.cpu_ms_per_step = 1e3 * cpu.per_step()
    return result
