"""Modes (a)-(c): the real `smolcluster server` + N `smolcluster worker` processes on loopback.

Each run gets its own config pair, secret and metrics directory; numbers come from the JSONL
metrics the processes write (the same files the Ansible report reads).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    LOOPBACK,
    ProcessGroup,
    child_env,
    cpu_marks,
    free_port_pair,
    python,
    step_counter,
)
from benchmarks.results import RunResult, summarize_elastic, summarize_socket

SERVER = "bench0"


def elastic_available() -> str | None:
    """None when the trainer implements elastic mode, else why not (printed as a note)."""
    try:
        from smolcluster import elastic  # noqa: F401
    except ImportError:
        return "the trainer has no elastic mode yet (no smolcluster.elastic)"
    return None


def write_configs(
    work: Path,
    n: int,
    port: int,
    batch_size: int,
    data_root: Path,
    *,
    quantize: bool = False,
    mode: str = "sync",
    update_interval: int = 50,
    threads: int = 1,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path, list[str]]:
    from smolcluster.protocol import write_secret

    work.mkdir(parents=True, exist_ok=True)
    workers = [f"bench{r}" for r in range(1, n + 1)]
    cluster = {
        "host_ip": dict.fromkeys([SERVER, *workers], LOOPBACK),
        "port": port,
        "num_workers": n,
        "workers": workers,
        "server": SERVER,
        "worker_update_interval": update_interval,
        "use_quantization": quantize,
        "seed": 42,
        "mode": mode,
        "backend": "socket",
        "bind_address": LOOPBACK,
        "secret_file": "secret",
        "metrics_dir": "metrics",
        "wandb_mode": "disabled",
        "torch_threads": threads,
        "connect_backoff_s": 0.2,
        "join_timeout_s": 120.0,
        "step_timeout_s": 120.0,
        **(extra or {}),
    }
    nn = {
        "batch_size": batch_size,
        "learning_rate": 0.001,
        "num_epochs": 1,
        "eval_steps": 1_000_000,
        "track_gradients": False,
        "model": {"type": "SimpleNN", "input_dim": 784, "hidden": 128, "out": 10},
        "dataset": {"name": "MNIST", "root": str(data_root), "download": False},
    }
    cluster_file, nn_file = work / "cluster.yaml", work / "nn.yaml"
    cluster_file.write_text(yaml.safe_dump(cluster))
    nn_file.write_text(yaml.safe_dump(nn))
    secret = work / "secret"
    if not secret.exists():
        write_secret(secret)
    return cluster_file, nn_file, workers


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
    epochs: int = 1,
    eval_steps: int = 1_000_000,
    threads: int = 1,
    timeout: float = 600.0,
    extra: dict[str, Any] | None = None,
    launch: Callable[[str], list[str]] | None = None,
) -> RunResult:
    """One run; `extra` adds or overrides cluster-config keys (server_lr, throttle_s, ...).

    `launch(host)` is an argv prefix per host (benchmarks/links.py: `ip netns exec <ns>`,
    with host_ip and bind_address in `extra`); default: plain processes on loopback."""
    port = free_port_pair()
    cluster_file, nn_file, workers = write_configs(
        out,
        n,
        port,
        batch_size,
        data_root,
        quantize=quantize,
        mode=mode,
        update_interval=update_interval,
        threads=threads,
        extra=extra,
    )
    common = [
        "--cluster-config",
        str(cluster_file),
        "--nn-config",
        str(nn_file),
        "--max-steps",
        str(steps),
        "--epochs",
        str(epochs),
        "--eval-steps",
        str(eval_steps),
    ]
    group = ProcessGroup(out / "logs", child_env(threads))
    cli = [python(), "-m", "smolcluster"]

    def prefix(host: str) -> list[str]:
        return launch(host) if launch else []

    group.start(SERVER, [*prefix(SERVER), *cli, "server", *common])
    for rank, host in enumerate(workers, start=1):
        group.start(
            host, [*prefix(host), *cli, "worker", *common, "--rank", str(rank), "--host", host]
        )
    progress = step_counter(out / "metrics" / f"{SERVER}.jsonl")
    if mode == "elastic":
        # The server logs one step event per merged push: steps * n / K of them.
        merges = steps * n // update_interval
        group.check(group.wait(timeout, progress, (1, max(2, merges - 1))))
        result = summarize_elastic(
            label, n, batch_size, update_interval, out / "metrics", SERVER, workers
        )
        # CPU per cluster step (n workers x one local step), comparable with sync rows.
        result.cpu_ms_per_step = 1e3 * group.cpu.per_step() * n / update_interval
        return result
    group.check(group.wait(timeout, progress, cpu_marks(steps)))
    result = summarize_socket(label, n, batch_size, out / "metrics", SERVER, workers)
    result.cpu_ms_per_step = 1e3 * group.cpu.per_step()
    return result
