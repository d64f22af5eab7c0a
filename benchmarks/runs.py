"""One benchmark run of each kind through the shared harness (smolcluster/harness.py), and the
numbers its JSONL metrics give for a table row: the real `smolcluster server` + N workers for
the socket modes, N `python -m smolcluster.gloo_backend` DDP ranks for gloo (same samples per
step, model, optimizer and seeded shards).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from benchmarks.common import CpuWindow, cpu_marks, fmt, median, per_step_bytes, percentile, table
from smolcluster.harness import (
    LOOPBACK,
    SERVER,
    GlooRanks,
    LocalCluster,
    Processes,
    count_events,
    read_events,
)
from smolcluster.model import build_model

EVAL_NEVER = 1_000_000  # eval_steps: only the final evaluation
GLOO = "gloo DDP"  # the reference mode's name in every table


@cache
def grad_bytes(hidden: int = 128) -> int:
    """Raw fp32 gradient bytes of the benchmarked model (one value per parameter)."""
    return 4 * sum(p.numel() for p in build_model("SimpleNN", 784, hidden, 10, 0).parameters())


@dataclass
class RunResult:
    mode: str
    workers: int
    batch_size: int
    steps: int
    step_ms_median: float
    step_ms_p90: float
    samples_per_s: float  # samples of all workers per second of median step
    sent_per_step: float  # bytes one worker sends per step (mean over workers)
    recv_per_step: float  # bytes one worker receives per step
    comm_fraction: float  # share of the step spent communicating (how: comm_how)
    comm_how: str
    final_accuracy: float | None = None
    cpu_ms_per_step: float = float("nan")  # CPU of all the run's processes per step
    evals: list[dict[str, Any]] = field(default_factory=list)
    steps_events: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("evals")
        row.pop("steps_events")
        sent, recv = self.sent_per_step / grad_bytes(), self.recv_per_step / grad_bytes()
        return {**row, "sent_ratio": sent, "recv_ratio": recv, "grad_bytes": grad_bytes()}


def _timed(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps after warm-up (the first few carry connection set-up and allocator growth)."""
    skip = min(3, len(steps) // 4)
    return steps[skip:]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _measured(
    run: Processes, lead: str, times: list[float], samples: float, sent: list, recv: list
) -> dict[str, Any]:
    """RunResult fields from per-step times (s), samples per step and per-process byte rates;
    the final accuracy, evals and step events are the `lead` process's (server, gloo rank 0)."""
    summary, step = run.events(lead, "summary"), median(times)
    return dict(
        step_ms_median=1e3 * step, step_ms_p90=1e3 * percentile(times, 90),
        samples_per_s=samples / step if step > 0 else float("nan"),
        sent_per_step=_mean(sent), recv_per_step=_mean(recv),
        final_accuracy=summary[0].get("final_accuracy") if summary else None,
        evals=run.events(lead, "eval"), steps_events=run.events(lead, "step"),
    )  # fmt: skip


def summarize_gloo(n: int, batch_size: int, ranks: GlooRanks, cpu_ms: float) -> RunResult:
    per_rank = [ranks.events(h, "step") for h in ranks.hosts]
    timed = _timed(per_rank[0])
    comm = median([s["comm_s"] / s["step_time_s"] for s in timed if s["step_time_s"] > 0])
    sent, recv = ([per_step_bytes(s, k) for s in per_rank] for k in ("bytes_sent", "bytes_recv"))
    return RunResult(
        GLOO, n, batch_size, len(per_rank[0]), comm_fraction=comm, cpu_ms_per_step=cpu_ms,
        comm_how="DDP comm hook: all-reduce launch to completion / step time",
        **_measured(ranks, "rank0", [s["step_time_s"] for s in timed], n * batch_size, sent, recv),
    )  # fmt: skip


def summarize_socket(
    mode: str, n: int, batch_size: int, cluster: LocalCluster, cpu_ms: float
) -> RunResult:
    steps = cluster.events(SERVER, "step")
    timed = _timed(steps)
    times = [s["step_time_s"] for s in timed]
    per_worker = [cluster.events(w, "step") for w in cluster.workers]
    # 1 - worker compute / server step: compute_s includes sending GRADS (a slight under-count).
    compute = [s["compute_s"] for steps in per_worker for s in _timed(steps) if "compute_s" in s]
    comm = max(0.0, 1 - median(compute) / median(times)) if compute else float("nan")
    how = "1 - median worker compute_s (fwd+bwd+GRADS send) / median server step time"
    samples = median([s.get("samples", n * batch_size) for s in timed])
    sent, recv = ([per_step_bytes(s, k) for s in per_worker] for k in ("bytes_sent", "bytes_recv"))
    return RunResult(
        mode, n, batch_size, len(steps), comm_fraction=comm, comm_how=how, cpu_ms_per_step=cpu_ms,
        **_measured(cluster, SERVER, times, samples, sent, recv),
    )  # fmt: skip


def summarize_elastic(
    mode: str, n: int, batch_size: int, k: int, cluster: LocalCluster, cpu_ms: float
) -> RunResult:
    """Elastic rows: a worker logs one step event per push, every k local steps, so per-step
    numbers are intervals between its pushes divided by the local steps in between."""
    per_worker = [cluster.events(w, "step") for w in cluster.workers]
    local_times, sent, recv = [], [], []
    for steps in per_worker:
        for a, b in itertools.pairwise(steps):
            local_times.append((b["wall"] - a["wall"]) / (b["step"] - a["step"]))
        if steps:  # with one push, counted from a zero start (the initial weights included)
            first = steps[0] if len(steps) >= 2 else {"step": 0, "bytes_sent": 0, "bytes_recv": 0}
            span = steps[-1]["step"] - first["step"]
            sent.append((steps[-1]["bytes_sent"] - first["bytes_sent"]) / span)
            recv.append((steps[-1]["bytes_recv"] - first["bytes_recv"]) / span)
    return RunResult(
        mode, n, batch_size, max((s[-1]["step"] for s in per_worker if s), default=0),
        comm_fraction=float("nan"), cpu_ms_per_step=cpu_ms,
        comm_how=f"elastic: one push/pull every {k} local steps (not split per step)",
        **_measured(cluster, SERVER, local_times, n * batch_size, sent, recv),
    )  # fmt: skip


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
    module: str = "smolcluster",
) -> LocalCluster:
    """The configured (not yet started) cluster; `extra` adds or overrides cluster-config keys
    (mode, use_quantization, server_lr, throttle_s, ...). `launch(host)` is an argv prefix per
    host (benchmarks/links.py: `ip netns exec <ns>`, with host_ip and bind_address in `extra`);
    default: plain processes on loopback. `module`: what `python -m` runs (LocalCluster)."""
    cluster = {"torch_threads": threads, "connect_backoff_s": 0.2, "step_timeout_s": 120.0}
    model = {"type": "SimpleNN", "input_dim": 784, "hidden": hidden, "out": 10}
    dataset = {"name": "MNIST", "root": str(data_root), "download": False}
    nn = {"batch_size": batch_size, "num_epochs": epochs, "eval_steps": eval_steps,
          "max_steps": steps, "model": model, "dataset": dataset}  # fmt: skip
    return LocalCluster(
        out, data_root, n, cluster={**cluster, **(extra or {})}, nn=nn, launch=launch, env=env,
        module=module,
    )  # fmt: skip


def _wait(
    run: Processes, lead: str, marks: Callable[[int], tuple[int, int]], timeout: float
) -> float:
    """Wait for `run` to end well; its processes' CPU ms per `lead` step between the marks,
    which `marks` makes from the steps the run really has (its start event's total_steps: a
    cap above what the data allows ends the run sooner)."""
    path = run.metrics_dir / f"{lead}.jsonl"
    window: list[CpuWindow] = []

    def poll() -> None:
        if not window:
            start = read_events(path, "start") if path.exists() else []
            if not start:
                return
            steps = marks(start[0]["total_steps"])
            window.append(CpuWindow(lambda: count_events(path, "step"), steps))
        window[0].poll(run.pids())

    run.wait(timeout, poll=poll, check=True)
    return 1e3 * window[0].per_step() if window else float("nan")


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
    """One run; `options` go to socket_cluster (epochs, eval_steps, threads, launch, ...)."""
    # min_workers: all N from the first step, as in sync: else, on a loaded machine, a late
    # starter can find an elastic run already over.
    config = {"mode": mode, "use_quantization": quantize, "worker_update_interval": update_interval,
              "min_workers": n, **(extra or {})}  # fmt: skip
    cluster = socket_cluster(
        out, n, data_root, steps=steps, batch_size=batch_size, extra=config, **options
    )
    cluster.start()
    k = update_interval
    if mode == "elastic":  # the server logs one step event per merged push: steps * n / K
        # In merges, from the steps asked for: merges come in bursts (every worker pushes
        # near the same local step), so marks from the run's own merge count would not
        # span its compute.
        cpu = _wait(cluster, SERVER, lambda _: (1, max(2, steps * n // k - 1)), timeout)
        # CPU per cluster step (n workers x one local step), comparable with sync rows.
        return summarize_elastic(label, n, batch_size, k, cluster, cpu * n / k)
    return summarize_socket(
        label, n, batch_size, cluster, _wait(cluster, SERVER, cpu_marks, timeout)
    )


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
    return summarize_gloo(n, batch_size, ranks, _wait(ranks, "rank0", cpu_marks, timeout))


def end_to_end_table(results: list[RunResult]) -> str:
    """The end-to-end table (loopback, or one link profile): each row against gloo's at its N."""
    gloo = {r.workers: r for r in results if r.mode == GLOO}
    rows = []
    for r in results:
        ref = gloo.get(r.workers)
        ratio = r.samples_per_s / ref.samples_per_s if ref else None
        cpu = r.cpu_ms_per_step / ref.cpu_ms_per_step if ref else None
        rows.append(
            [r.mode, str(r.workers), fmt(r.step_ms_median), fmt(r.step_ms_p90),
             fmt(r.samples_per_s, ".0f"), fmt(ratio, ".2f"), fmt(r.cpu_ms_per_step),
             fmt(cpu, ".2f"), fmt(r.sent_per_step, ",.0f"),
             fmt(r.sent_per_step / grad_bytes(), ".4f"), fmt(r.recv_per_step, ",.0f"),
             fmt(100 * r.comm_fraction, ".0f")]
        )  # fmt: skip
    return table(
        "mode|N|step ms p50|step ms p90|samples/s|x gloo|CPU ms/step|CPU x gloo|"
        "B sent/worker/step|÷ fp32 grads|B recv/worker/step|comm %",
        rows,
    )
