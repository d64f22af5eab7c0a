"""Peak RSS of a real server and worker, beyond what `import torch, torchvision` alone costs.

    python -m benchmarks.run --only rss              # offline digits and full MNIST, N=3
    python -m benchmarks.run --only rss --code DIR   # the trainer of another checkout

A short sync run of the real CLI with evaluations on the server; each process records its own
peak RSS as it exits (LAUNCHER). Full MNIST comes from `smolcluster data fetch`; without it
that dataset is skipped with a note.
"""

from __future__ import annotations

import os
import subprocess
import sys
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, code_env, table
from smolcluster.harness import SERVER, LocalCluster, Processes

MB = 1e6
WORKERS, STEPS = 3, 60  # the default run: 3 workers (20,000 samples each on full MNIST)
BASELINE = "import torch, torchvision"
GOAL_MB = 120  # issue 14: a worker's RSS beyond the import, on full MNIST
FULL_MNIST = REPO / ".cache" / "full-mnist"  # `smolcluster data fetch` puts it here


@dataclass
class RssRow:
    dataset: str
    process: str  # "server", "worker (max of N)" or the baseline
    peak_mb: float
    beyond_mb: float  # peak minus the baseline's peak


# Runs `PYTHON -m module args...` or `PYTHON -c code` and, at exit, writes the process's peak
# RSS to argv[1]. It is taken from an atexit hook registered first (so it runs after every
# other hook) and before the interpreter tears modules down: torchvision's teardown in this
# CUDA build of torch pages in ~125 MB for a moment in every process, the baseline's too.
# /proc's VmHWM is this process's own peak; ru_maxrss would also count the harness that
# spawned it (until the exec), which has imported torch itself. macOS has no /proc: ru_maxrss.
LAUNCHER = """
import atexit, resource, runpy, sys
out, how, what = sys.argv[1], *sys.argv[3:5]
def record():
    try:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        peak = int(status["VmHWM"].split()[0]) * 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(out, "w") as f:
        f.write(str(peak))
atexit.register(record)
sys.argv = [what, *sys.argv[5:]]
exec(what) if how == "-c" else runpy.run_module(what, run_name="__main__", alter_sys=True)
"""


def peak_rss(run: Processes, timeout: float) -> dict[str, float]:
    """Wait for `run`, whose processes `recording` wrapped: {name: peak RSS MB}."""
    run.wait(timeout, check=True)
    return {name: int((run.dir / f"{name}.peak").read_text()) / MB for name in run.procs}


def recording(work: Path) -> Callable[[str], list[str]]:
    """The harness's argv prefix that runs a process under LAUNCHER, peak to <name>.peak."""
    return lambda name: [sys.executable, "-c", LAUNCHER, str(work / f"{name}.peak")]


def baseline_mb(code: Path, work: Path) -> float:
    run = Processes(work, launch=recording(work), env=code_env(code))
    run.start_process("baseline", [sys.executable, "-c", BASELINE])
    return peak_rss(run, 120)["baseline"]


def measure_run(dataset: str, data_root: Path, code: Path, work: Path, base: float) -> list[RssRow]:
    """One sync run: the server's peak and the largest worker peak."""
    cluster = LocalCluster(
        work, data_root, WORKERS, nn={"max_steps": STEPS, "eval_steps": STEPS // 2},
        launch=recording(work), env=code_env(code),
    )  # fmt: skip
    cluster.start()
    peaks = peak_rss(cluster, 600)
    worker = max(peaks[h] for h in cluster.workers)
    return [
        RssRow(dataset, "server", peaks[SERVER], peaks[SERVER] - base),
        RssRow(dataset, f"worker (max of {WORKERS})", worker, worker - base),
    ]


def fetch_full_mnist(root: Path) -> str | None:
    """None when full MNIST is at `root` (fetched now if needed), else why not."""
    argv = [sys.executable, "-m", "smolcluster", "data", "fetch", "--root", str(root)]
    env = {**os.environ, **code_env()}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    return None if done.returncode == 0 else (done.stderr.strip() or done.stdout.strip())[-300:]


def measure_code(code: Path, work: Path, digits: Path) -> dict[str, Any]:
    """The baseline, then offline digits and full MNIST, with `code`'s trainer."""
    notes: list[str] = []
    load_before = os.getloadavg()[0]
    base = baseline_mb(code, work / "baseline")
    rows = [RssRow("-", BASELINE, base, 0.0)]
    rows += measure_run("offline digits", digits, code, work / "digits", base)
    why = fetch_full_mnist(FULL_MNIST)
    if why is None:
        rows += measure_run("full MNIST", FULL_MNIST, code, work / "full", base)
    else:
        notes.append(f"RSS on full MNIST skipped: {why}")
    notes.append(f"load average (1 min) around the RSS runs: {load_before:.1f} -> "
                 f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    return {"code": str(code), "rows": rows, "notes": notes}


def measure(a: Namespace, work: Path) -> list[dict[str, Any]]:
    """The rss part of benchmarks.run: one table per --code checkout."""
    return [measure_code(code, work / str(i), a.data_root) for i, code in enumerate(a.code)]


def report(runs: list[dict[str, Any]], a: Namespace) -> str:
    texts = [[table_of(r["rows"]), f"trainer code: {r['code']}", *r["notes"]] for r in runs]
    return "\n\n".join("\n\n".join(text) for text in texts)


def table_of(rows: list[RssRow]) -> str:
    cells = [[r.dataset, r.process, f"{r.peak_mb:.0f}", f"{r.beyond_mb:.0f}"] for r in rows]
    text = (
        f"## Peak RSS (sync, N={WORKERS}, {STEPS} steps, batch 32, server evaluates twice)\n\n"
        + table(f"dataset|process|peak RSS MB|beyond `{BASELINE}` MB", cells)
    )
    full = [r.beyond_mb for r in rows if r.dataset == "full MNIST" and r.process[0] == "w"]
    if full:
        met = "met" if full[0] <= GOAL_MB else "MISSED"
        text += f"\n\ngoal: worker beyond the import <= {GOAL_MB} MB on full MNIST: "
        text += f"{full[0]:.0f} MB, {met}"
    return text
