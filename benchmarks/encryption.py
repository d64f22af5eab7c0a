"""What encryption costs a sync step, measured with it on and off in the same run.

The same sync fp32 run at N=3 on loopback (same steps, seed and batch), once as the real
`smolcluster` processes (on) and once with every process started as `python -m
benchmarks.plaintext` (off: a null AEAD with the same tag size, so the same frames and code
paths without the cipher passes), in interleaved rounds whose order alternates (on, off, then
off, on, ...) so drift in the machine's load hits both sides alike. Medians over the rounds.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Any

from benchmarks.common import code_env, fmt, median, table
from benchmarks.runs import RunResult, run_socket

GOAL = 0.05  # issue 14: encryption on at most 5 % slower
N = 3
MODULES = {"on": "smolcluster", "off": "benchmarks.plaintext"}


def measure(a: Namespace, work: Path) -> dict[str, Any]:
    """--steps of sync fp32 at N=3, --crypto-rounds times each way."""
    steps, rounds = a.steps, a.crypto_rounds
    runs: dict[str, list[RunResult]] = {"on": [], "off": []}
    for i in range(rounds):
        for side in ("on", "off") if i % 2 == 0 else ("off", "on"):
            print(f"  encryption {side}, round {i + 1}/{rounds} (N={N}, {steps} steps)", flush=True)
            label, out = f"sync fp32, encryption {side}", work / f"{side}-{i}"
            kw = {"threads": a.threads, "module": MODULES[side], "env": code_env()}
            runs[side].append(run_socket(label, N, steps, a.batch_size, a.data_root, out, **kw))
    row: dict[str, Any] = {"n": N, "steps": steps, "rounds": rounds}
    for side, results in runs.items():
        row[f"samples_per_s_{side}"] = median([r.samples_per_s for r in results])
        row[f"cpu_ms_per_step_{side}"] = median([r.cpu_ms_per_step for r in results])
        row[f"sent_per_step_{side}"] = median([r.sent_per_step for r in results])
        row[f"runs_{side}"] = [r.as_dict() for r in results]
    row["ratio"] = row["samples_per_s_on"] / row["samples_per_s_off"]
    row["slowdown"] = 1 / row["ratio"] - 1  # extra time per sample with encryption on
    return row


def report(row: dict[str, Any], a: Namespace) -> str:
    cells = [[
        str(row["n"]), f"{row['steps']} x {row['rounds']}",
        fmt(row["samples_per_s_on"], ".0f"), fmt(row["samples_per_s_off"], ".0f"),
        fmt(row["ratio"], ".3f"), fmt(100 * row["slowdown"], ".1f"),
        fmt(row["cpu_ms_per_step_on"]), fmt(row["cpu_ms_per_step_off"]),
        "met" if row["slowdown"] <= GOAL else "MISSED",
    ]]  # fmt: skip
    header = (
        "N|steps x rounds|samples/s on|samples/s off|on ÷ off|slowdown %|CPU ms/step on|"
        f"CPU ms/step off|≤ {GOAL:.0%}"
    )
    title = f"## Encryption on vs off: sync fp32 at N={N} (medians, same run)"
    return f"{title}\n\n{table(header, cells)}"
