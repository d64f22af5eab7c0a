"""Turn the JSONL metrics of one run into the numbers the table shows."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from benchmarks.common import median, of, per_step_bytes, percentile, read_events


@cache
def grad_bytes(hidden: int = 128) -> int:
    """Raw fp32 gradient bytes of the benchmarked model (one value per parameter)."""
    from smolcluster.model import build_model

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
    note: str = ""

    @property
    def sent_ratio(self) -> float:
        return self.sent_per_step / grad_bytes()

    @property
    def recv_ratio(self) -> float:
        return self.recv_per_step / grad_bytes()

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("evals")
        row.pop("steps_events")
        row.update(sent_ratio=self.sent_ratio, recv_ratio=self.recv_ratio, grad_bytes=grad_bytes())
        return row


def _timed(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps after warm-up (the first few carry connection set-up and allocator growth)."""
    skip = min(3, len(steps) // 4)
    return steps[skip:]


def summarize_gloo(n: int, batch_size: int, metrics: Path, hosts: list[str]) -> RunResult:
    per_rank = {h: read_events(metrics / f"{h}.jsonl") for h in hosts}
    lead = per_rank[hosts[0]]
    steps = of(lead, "step")
    timed = _timed(steps)
    times = [s["step_time_s"] for s in timed]
    comm = [s["comm_s"] / s["step_time_s"] for s in timed if s["step_time_s"] > 0]
    sent = [per_step_bytes(of(ev, "step"), "bytes_sent") for ev in per_rank.values()]
    recv = [per_step_bytes(of(ev, "step"), "bytes_recv") for ev in per_rank.values()]
    summary = of(lead, "summary")
    source = summary[0].get("bytes_source", "?") if summary else "?"
    return RunResult(
        mode="gloo DDP",
        workers=n,
        batch_size=batch_size,
        steps=len(steps),
        step_ms_median=1e3 * median(times),
        step_ms_p90=1e3 * percentile(times, 90),
        samples_per_s=n * batch_size / median(times),
        sent_per_step=sum(sent) / len(sent),
        recv_per_step=sum(recv) / len(recv),
        comm_fraction=median(comm),
        comm_how="DDP comm hook: all-reduce launch to completion / step time",
        final_accuracy=summary[0].get("final_accuracy") if summary else None,
        evals=of(lead, "eval"),
        steps_events=steps,
        note=f"bytes: {source}",
    )


def summarize_socket(
    mode: str, n: int, batch_size: int, metrics: Path, server: str, workers: list[str]
) -> RunResult:
    srv = read_events(metrics / f"{server}.jsonl")
    steps = of(srv, "step")
    timed = _timed(steps)
    times = [s["step_time_s"] for s in timed]
    per_worker = {w: of(read_events(metrics / f"{w}.jsonl"), "step") for w in workers}
    sent = [per_step_bytes(s, "bytes_sent") for s in per_worker.values()]
    recv = [per_step_bytes(s, "bytes_recv") for s in per_worker.values()]
    comm, how = _socket_comm(timed, per_worker)
    summary = of(srv, "summary")
    samples = median([s.get("samples", n * batch_size) for s in timed])
    return RunResult(
        mode=mode,
        workers=n,
        batch_size=batch_size,
        steps=len(steps),
        step_ms_median=1e3 * median(times),
        step_ms_p90=1e3 * percentile(times, 90),
        samples_per_s=samples / median(times),
        sent_per_step=sum(sent) / len(sent),
        recv_per_step=sum(recv) / len(recv),
        comm_fraction=comm,
        comm_how=how,
        final_accuracy=summary[0].get("final_accuracy") if summary else None,
        evals=of(srv, "eval"),
        steps_events=steps,
    )


def _socket_comm(
    timed: list[dict[str, Any]], per_worker: dict[str, list[dict[str, Any]]]
) -> tuple[float, str]:
    """Prefer the trainer's own comm timing; else 1 - worker compute / server step time."""
    worker_steps = [s for steps in per_worker.values() for s in _timed(steps)]
    if worker_steps and all("comm_s" in s and "step_time_s" in s for s in worker_steps):
        return (
            median([s["comm_s"] / s["step_time_s"] for s in worker_steps]),
            "worker comm_s / step_time_s",
        )
    compute = [s["compute_s"] for s in worker_steps if "compute_s" in s]
    step = median([s["step_time_s"] for s in timed])
    if not compute or not step > 0:
        return float("nan"), "not measurable from these metrics"
    return (
        max(0.0, 1 - median(compute) / step),
        "1 - median worker compute_s (fwd+bwd+GRADS send) / median server step time",
    )


def summarize_elastic(
    mode: str, n: int, batch_size: int, k: int, metrics: Path, server: str, workers: list[str]
) -> RunResult:
    """Elastic rows: a worker logs one step event per push, every k local steps, so per-step
    numbers are intervals between its pushes divided by the local steps in between."""
    srv = read_events(metrics / f"{server}.jsonl")
    per_worker = {w: of(read_events(metrics / f"{w}.jsonl"), "step") for w in workers}
    local_times, sent, recv = [], [], []
    for steps in per_worker.values():
        for a, b in itertools.pairwise(steps):
            local_times.append((b["wall"] - a["wall"]) / (b["step"] - a["step"]))
        if len(steps) >= 2:
            span = steps[-1]["step"] - steps[0]["step"]
            sent.append((steps[-1]["bytes_sent"] - steps[0]["bytes_sent"]) / span)
            recv.append((steps[-1]["bytes_recv"] - steps[0]["bytes_recv"]) / span)
        elif steps:  # one push: count from the start (includes the initial weights)
            sent.append(steps[0]["bytes_sent"] / steps[0]["step"])
            recv.append(steps[0]["bytes_recv"] / steps[0]["step"])
    summary = of(srv, "summary")
    step = median(local_times)
    return RunResult(
        mode=mode,
        workers=n,
        batch_size=batch_size,
        steps=max((s[-1]["step"] for s in per_worker.values() if s), default=0),
        step_ms_median=1e3 * step,
        step_ms_p90=1e3 * percentile(local_times, 90),
        samples_per_s=n * batch_size / step if step > 0 else float("nan"),
        sent_per_step=sum(sent) / len(sent) if sent else float("nan"),
        recv_per_step=sum(recv) / len(recv) if recv else float("nan"),
        comm_fraction=float("nan"),
        comm_how=f"elastic: one push/pull every {k} local steps (not split out per step)",
        final_accuracy=summary[0].get("final_accuracy") if summary else None,
        evals=of(srv, "eval"),
        steps_events=of(srv, "step"),
        note=f"per local step, averaged over pushes every {k} steps",
    )
