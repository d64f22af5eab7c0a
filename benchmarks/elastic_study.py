"""Elastic mode, measured: which merge rule, what int8 costs, and a 5x slower worker.

Every row is a full run of the real server and workers on loopback over the same data, seed
and sample budget (options: benchmarks.run's --tta-workers, --study-epochs, --study-k,
--batch-size, --study-max-steps).
- rules: the elastic merge rule (server_lr, server_momentum) against the sync run.
- int8: the same sync and elastic runs with use_quantization, the accuracy difference.
- slow: one worker throttled to ~5x its step time; wall time to the same sample budget.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import fmt, median, table
from benchmarks.runs import run_socket
from smolcluster.harness import SERVER, read_events, worker_names

# (label, cluster-config keys) of the merge rules compared; the first is the shipped default.
RULES: list[tuple[str, dict[str, Any]]] = [
    ("average (lr 1, no momentum)", {"server_lr": 1.0, "server_momentum": 0.0}),
    ("sum (lr = N)", {"server_lr": "N", "server_momentum": 0.0}),
    ("Nesterov lr 0.7 mu 0.9 (DiLoCo)", {"server_lr": 0.7, "server_momentum": 0.9}),
    ("Nesterov lr 1 mu 0.5", {"server_lr": 1.0, "server_momentum": 0.5}),
]


@dataclass
class Row:
    part: str
    label: str
    mode: str
    workers: int
    k: int | None
    wall_s: float  # first merge or step begun -> summary written
    final_accuracy: float | None
    samples: int | None
    bytes_per_sample: float | None  # both directions, all workers

    def cells(self) -> list[str]:
        acc, per = fmt(self.final_accuracy, ".4f"), fmt(self.bytes_per_sample, ",.0f")
        return [self.label, self.mode, str(self.workers), str(self.k or "-"), acc,
                fmt(self.wall_s), per]  # fmt: skip


def _row(part: str, label: str, mode: str, n: int, k: int | None, out: Path) -> Row:
    events = out / "metrics" / f"{SERVER}.jsonl"
    start = read_events(events, "start")[0]["wall"]
    summary = read_events(events, "summary")[-1]
    samples = summary.get("samples")
    traffic = (summary.get("bytes_sent") or 0) + (summary.get("bytes_recv") or 0)
    return Row(
        part=part, label=label, mode=mode, workers=n, k=k, wall_s=summary["wall"] - start,
        final_accuracy=summary.get("final_accuracy"), samples=samples,
        bytes_per_sample=traffic / samples if samples else None,
    )  # fmt: skip


def _run(a: Namespace, part: str, label: str, mode: str, out: Path, **kw: Any) -> Row:
    k = a.study_k if mode == "elastic" else None
    run_socket(
        label, a.tta_workers, a.study_max_steps, a.batch_size, a.data_root, out,
        mode=mode, update_interval=a.study_k, epochs=a.study_epochs, timeout=1800, **kw,
    )  # fmt: skip
    row = _row(part, label, mode, a.tta_workers, k, out)
    print(f"  {part}: {label}: acc {row.final_accuracy} in {row.wall_s:.1f} s", flush=True)
    return row


def rules(a: Namespace, work: Path) -> list[Row]:
    rows = [_run(a, "rules", "sync fp32", "sync", work / "rules-sync")]
    for i, (label, keys) in enumerate(RULES):
        keys = {k: (a.tta_workers if v == "N" else v) for k, v in keys.items()}
        rows.append(_run(a, "rules", label, "elastic", work / f"rules-{i}", extra=keys))
    return rows


def int8(a: Namespace, work: Path) -> list[Row]:
    rows = []
    for mode in ("sync", "elastic"):
        for quant in (False, True):
            label = f"{mode} {'int8' if quant else 'fp32'}"
            out = work / f"int8-{mode}-{quant}"
            rows.append(_run(a, "int8", label, mode, out, quantize=quant))
    return rows


def slow(a: Namespace, work: Path) -> list[Row]:
    """Worker 1 sleeps after each step so its steps take ~5x as long as an unthrottled one."""
    rows = [_run(a, "slow", "sync, no slow worker", "sync", work / "slow-ref")]
    # A 5x slower machine: its batch costs 4 more of its measured compute times.
    compute = [
        e["compute_s"]
        for w in worker_names(a.tta_workers)
        for e in read_events(work / "slow-ref" / "metrics" / f"{w}.jsonl", "step")
        if "compute_s" in e
    ]
    a.throttle_s = round(4 * median(compute), 4)  # for the report
    throttle = {"throttle_s": {worker_names(1)[0]: a.throttle_s}}
    rows.append(_run(a, "slow", "sync", "sync", work / "slow-sync", extra=throttle))
    rows.append(
        _run(a, "slow", "sync, balance auto", "sync", work / "slow-bal",
             extra={**throttle, "balance": "auto"})
    )  # fmt: skip
    rows.append(_run(a, "slow", "elastic", "elastic", work / "slow-elastic", extra=throttle))
    return rows


PARTS = {"rules": rules, "int8": int8, "slow": slow}
TITLES = {
    "rules": "Elastic merge rules against sync (same samples)",
    "int8": "int8 on the wire: accuracy against fp32 (same runs otherwise)",
    "slow": "One worker ~5x slower: time to finish the same samples",
}


def measure(a: Namespace, work: Path) -> list[Row]:
    return [row for name in a.study for row in PARTS[name](a, work)]


def report(rows: list[Row], a: Namespace) -> str:
    out = []
    for name in dict.fromkeys(r.part for r in rows):
        n, epochs, k = a.tta_workers, a.study_epochs, a.study_k
        out.append(f"## {TITLES[name]}\n\nN={n}, {epochs} epoch(s), elastic K={k}")
        if name == "slow":
            out[-1] += f", worker 1 sleeps {a.throttle_s} s per step"
        header = "run|mode|N|K|final acc|wall s|B on wire / sample"
        out.append(table(header, [r.cells() for r in rows if r.part == name]))
    return "\n\n".join(out)
