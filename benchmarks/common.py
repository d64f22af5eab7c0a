"""What the benchmark modules share: the data root, the header, a CPU window, statistics, tables."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def default_data_root() -> Path:
    """The offline digits, cached where the tests cache them (tests/conftest.py)."""
    return Path(os.environ.get("SMOLCLUSTER_TEST_DATA") or REPO / ".cache" / "test-data")


def code_env(code: Path = REPO) -> dict[str, str]:
    """Trainer processes' environment: `code`'s smolcluster first (--code measures another
    checkout's trainer), then this checkout, for `python -m benchmarks...` children."""
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys([str(code), str(REPO)]))}


def machine() -> dict[str, str]:
    """Where and on what the numbers were taken: printed in the header and kept in --json."""
    import torch

    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        models = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]  # fmt: skip
        cpu = models[0].split(":", 1)[1].strip() if models else cpu
    git = ["git", "describe", "--always", "--dirty"]  # -dirty: uncommitted changes ran
    commit = subprocess.run(git, capture_output=True, text=True, cwd=REPO, check=False).stdout
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": commit.strip() or "?",
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def header(info: dict[str, str]) -> str:
    return (
        f"# smolcluster benchmarks, {info['date']}, commit {info['commit']}\n"
        f"machine: {info['nproc']} CPUs, {info['cpu']}, torch {info['torch']}, python "
        f"{info['python']}, {info['os']}; load average (1, 5, 15 min) {info['load']}"
    )


class CpuWindow:
    """CPU seconds (user + system, all threads) of a run's processes between two step marks,
    from /proc: unlike wall time, it barely moves when other jobs share the cores. `poll` is
    called by the harness while the run waits; `progress` counts the steps done so far."""

    def __init__(self, progress: Callable[[], int], marks: tuple[int, int]) -> None:
        self.progress = progress
        self.marks = marks
        self.start: tuple[int, float] | None = None
        self.end: tuple[int, float] | None = None

    def poll(self, pids: list[int]) -> None:
        if self.end is not None:
            return
        done = self.progress()
        if done < (self.marks[0] if self.start is None else self.marks[1]):
            return
        total = 0.0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                # A process is gone: no clean window, and none that starts this late.
                self.start, self.end = None, (done, float("nan"))
                return
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if self.start is None:
            self.start = (done, total)
        else:
            self.end = (done, total)

    def per_step(self) -> float:
        """CPU seconds per step; NaN without a window, or when its CPU did not move by one
        clock tick (marks passed within a poll or two: too short to measure, not free)."""
        if self.start is None or self.end is None:
            return float("nan")
        (first_step, first_cpu), (last_step, last_cpu) = self.start, self.end
        if last_step <= first_step or last_cpu <= first_cpu:
            return float("nan")
        return (last_cpu - first_cpu) / (last_step - first_step)


def cpu_marks(steps: int) -> tuple[int, int]:
    """The CPU window: after warm-up to a tenth before the end. The last steps go by faster
    than the 10 ms poll can follow, and the processes exit right after them."""
    return min(5, steps // 4), steps - max(2, steps // 10)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); no interpolation between samples."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def per_step_bytes(steps: list[dict[str, Any]], key: str) -> float:
    """Bytes per step from cumulative counters, skipping the first step (it carries set-up)."""
    if len(steps) < 3:
        return float("nan")
    first, last = steps[1], steps[-1]
    return (last[key] - first[key]) / (last["step"] - first["step"])


def time_to_accuracy(
    steps: list[dict[str, Any]], evals: list[dict[str, Any]], target: float, lead_in: float = 0.0
) -> tuple[int, float] | None:
    """(step, seconds since the first step began) of the first eval at or above target.

    lead_in: seconds of work before the first step event when it carries no step_time_s
    (elastic: the server's first event is the first merge, K local steps in).
    """
    if not steps:
        return None
    began = steps[0]["wall"] - steps[0].get("step_time_s", lead_in)
    for e in evals:
        if e["val_accuracy"] >= target:
            return e["step"], e["wall"] - began
    return None


def slug(mode: str) -> str:
    """A mode's name as a directory name: 'sync fp32, server trains' -> sync-fp32-server-trains."""
    return re.sub(r"[^a-z0-9=]+", "-", mode.lower()).strip("-")


def fmt(value: float | None, spec: str = ".1f") -> str:
    """A table cell: '-' for a missing or NaN number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def table(header: str, rows: list[list[str]]) -> str:
    """A Markdown table, columns padded; `header` is the column names joined by '|'."""
    names = header.split("|")
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(names)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(names), sep, *(line(r) for r in rows)])
