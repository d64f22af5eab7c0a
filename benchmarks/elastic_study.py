"""Elastic mode, measured: which merge rule, what int8 costs, and a 5x slower worker.

    python -m benchmarks.elastic_study                 # all three parts, ~10 min on 2 cores
    python -m benchmarks.elastic_study --part rules    # just the merge-rule comparison

Every row is a full run of the real server and workers on loopback (benchmarks/socket_runs.py)
over the same data, seed and sample budget; accuracies are the server's final test accuracy.
- rules: the elastic merge rule (server_lr, server_momentum) against the sync run.
- int8: the same sync and elastic runs with use_quantization, the accuracy difference.
- slow: one worker throttled so each of its steps takes about 5x as long; wall time to finish
  the same sample budget and accuracy, for sync, sync with balance: auto, and elastic.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import default_data_root, median, of, prepare_data, read_events
from benchmarks.socket_runs import SERVER, run_socket

# (label, cluster-config keys) of the merge rules compared; the first is the shipped default.
RULES: list[tuple[str, dict[str, Any]]] = [
    ("average (lr 1, no momentum)", {"server_lr": 1.0, "server_momentum": 0.0}),
    ("sum (lr = N)", {"server_lr": "N", "server_momentum": 0.0}),
    ("Nesterov lr 0.7 mu 0.9 (DiLoCo)", {"server_lr": 0.7, "server_momentum": 0.9}),
    ("Nesterov lr 1 mu 0.5", {"server_lr": 1.0, "server_momentum": 0.5}),
]


@dataclass
class Options:
    workers: int = 3
    epochs: int = 2
    k: int = 10  # elastic push/pull interval
    batch_size: int = 32
    throttle_s: float = 0.0  # per-step sleep of worker 1; 0: 4x its measured compute per step
    max_steps: int = 1_000_000  # cap per run (tiny runs in tests)
    data_root: Path = field(default_factory=default_data_root)


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
        acc = "-" if self.final_accuracy is None else f"{self.final_accuracy:.4f}"
        per = "-" if self.bytes_per_sample is None else f"{self.bytes_per_sample:,.0f}"
        return [self.label, self.mode, str(self.workers), str(self.k or "-"), acc,
                f"{self.wall_s:.1f}", per]  # fmt: skip


def _row(part: str, label: str, mode: str, n: int, k: int | None, out: Path) -> Row:
    events = read_events(out / "metrics" / f"{SERVER}.jsonl")
    start = of(events, "start")[0]["wall"]
    summary = of(events, "summary")[-1]
    samples = summary.get("samples")
    traffic = (summary.get("bytes_sent") or 0) + (summary.get("bytes_recv") or 0)
    return Row(
        part=part,
        label=label,
        mode=mode,
        workers=n,
        k=k,
        wall_s=summary["wall"] - start,
        final_accuracy=summary.get("final_accuracy"),
        samples=samples,
        bytes_per_sample=traffic / samples if samples else None,
    )


def _run(a: Options, part: str, label: str, mode: str, out: Path, **kw: Any) -> Row:
    k = a.k if mode == "elastic" else None
    run_socket(
        label,
        a.workers,
        a.max_steps,
        a.batch_size,
        a.data_root,
        out,
        mode=mode,
        update_interval=a.k,
        epochs=a.epochs,
        threads=1,
        timeout=1800,
        **kw,
    )
    row = _row(part, label, mode, a.workers, k, out)
    print(f"  {part}: {label}: acc {row.final_accuracy} in {row.wall_s:.1f} s", flush=True)
    return row


def rules(a: Options, work: Path) -> list[Row]:
    rows = [_run(a, "rules", "sync fp32", "sync", work / "rules-sync")]
    for i, (label, keys) in enumerate(RULES):
        keys = {k: (a.workers if v == "N" else v) for k, v in keys.items()}
        rows.append(_run(a, "rules", label, "elastic", work / f"rules-{i}", extra=keys))
    return rows


def int8(a: Options, work: Path) -> list[Row]:
    rows = []
    for mode in ("sync", "elastic"):
        for quant in (False, True):
            label = f"{mode} {'int8' if quant else 'fp32'}"
            out = work / f"int8-{mode}-{quant}"
            rows.append(_run(a, "int8", label, mode, out, quantize=quant))
    return rows


def slow(a: Options, work: Path) -> list[Row]:
    """Worker 1 sleeps after each step so its steps take ~5x as long as an unthrottled one."""
    rows = [_run(a, "slow", "sync, no slow worker", "sync", work / "slow-ref")]
    if not a.throttle_s:
        # A 5x slower machine: its batch costs 4 more of its measured compute times.
        compute = [
            e["compute_s"]
            for w in range(1, a.workers + 1)
            for e in of(read_events(work / "slow-ref" / "metrics" / f"bench{w}.jsonl"), "step")
            if "compute_s" in e
        ]
        a.throttle_s = round(4 * median(compute), 4)
    throttle = {"throttle_s": {"bench1": a.throttle_s}}
    rows.append(_run(a, "slow", "sync", "sync", work / "slow-sync", extra=throttle))
    rows.append(
        _run(a, "slow", "sync, balance auto", "sync", work / "slow-bal",
             extra={**throttle, "balance": "auto"})
    )  # fmt: skip
    rows.append(_run(a, "slow", "elastic", "elastic", work / "slow-elastic", extra=throttle))
    return rows


def markdown(rows: list[Row]) -> str:
    header = ["run", "mode", "N", "K", "final acc", "wall s", "B on wire / sample"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


PARTS = {"rules": rules, "int8": int8, "slow": slow}
TITLES = {
    "rules": "Elastic merge rules against sync (same samples)",
    "int8": "int8 on the wire: accuracy against fp32 (same runs otherwise)",
    "slow": "One worker ~5x slower: time to finish the same samples",
}


def run_parts(parts: list[str], a: Options) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="smolcluster-elastic-"))
    try:
        return [row for name in parts for row in PARTS[name](a, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(rows: list[Row], a: Options) -> str:
    out = []
    for name in dict.fromkeys(r.part for r in rows):
        out.append(f"## {TITLES[name]}\n\nN={a.workers}, {a.epochs} epoch(s), elastic K={a.k}")
        if name == "slow":
            out[-1] += f", worker 1 sleeps {a.throttle_s} s per step"
        out.append(markdown([r for r in rows if r.part == name]))
    return "\n\n".join(out)


def goals(rows: list[Row]) -> list[str]:
    """Issue 4's measurable goals, met or missed, from whichever parts ran."""
    acc = {(r.part, r.label): r.final_accuracy for r in rows}
    wall = {(r.part, r.label): r.wall_s for r in rows}
    lines = []
    for mode in ("sync", "elastic"):
        fp32, int8 = acc.get(("int8", f"{mode} fp32")), acc.get(("int8", f"{mode} int8"))
        if fp32 is not None and int8 is not None:
            cost = 100 * (fp32 - int8)
            lines.append(
                f"[{'met' if cost <= 0.5 else 'MISSED'}] {mode} int8 accuracy "
                f"{int8:.4f} vs fp32 {fp32:.4f}: {cost:+.1f} points lost (goal ≤ 0.5)"
            )
    sync, elastic = ("slow", "sync"), ("slow", "elastic")
    if sync in wall and elastic in wall and acc.get(sync) is not None and acc.get(elastic):
        sooner = wall[sync] / wall[elastic]
        cost = 100 * (acc[sync] - acc[elastic])
        lines.append(
            f"[{'met' if sooner > 1 and cost <= 1.0 else 'MISSED'}] one worker 5x slower: "
            f"elastic finished {sooner:.2f}x sooner than sync ({wall[elastic]:.1f} s vs "
            f"{wall[sync]:.1f} s), accuracy {acc[elastic]:.4f} vs {acc[sync]:.4f} "
            f"(goal: sooner, within 1 point)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.elastic_study", description=__doc__)
    p.add_argument("--part", choices=list(PARTS), nargs="+", default=list(PARTS))
    defaults = Options()
    for name in ("workers", "epochs", "k", "batch_size", "throttle_s", "max_steps"):
        value = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--data-root", type=Path, default=defaults.data_root)
    p.add_argument("--json", type=Path)
    args = vars(p.parse_args(argv))
    parts, json_path = args.pop("part"), args.pop("json")
    a = Options(**{**args, "data_root": args["data_root"].resolve()})
    print(f"dataset: {prepare_data(a.data_root)}", flush=True)
    rows = run_parts(parts, a)
    print("\n" + report(rows, a))
    if json_path:
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
