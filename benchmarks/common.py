"""Shared plumbing for the benchmark harness: ports, processes, metrics files, statistics."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from smolcluster.events import RecordStream, of_kind, read_records

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"  # the network rule: loopback, or only namespaces of our own (links.py)


def default_data_root() -> Path:
    """The offline digits, cached where the tests cache them (tests/conftest.py)."""
    return Path(os.environ.get("SMOLCLUSTER_TEST_DATA") or REPO / ".cache" / "test-data")


def prepare_data(root: Path) -> str:
    from smolcluster.offline_digits import build_offline_digits

    return build_offline_digits(root).source


def free_port_pair() -> int:
    """A port p with p and p + 1 both free on loopback (socket port, gloo rendezvous port)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((LOOPBACK, port))
                b.bind((LOOPBACK, port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of loopback ports")


def child_env(threads: int) -> dict[str, str]:
    """Same thread budget for every process of every mode, so only the exchange differs."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


class ProcessGroup:
    """Child processes of one run; each in its own session so a timeout kills just ours."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str]) -> None:
        with (self.log_dir / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.log_dir,
                start_new_session=True,
            )
        self.procs.append((name, proc))

    def wait(
        self,
        timeout: float,
        progress: Callable[[], int] | None = None,
        marks: tuple[int, int] = (0, 0),
    ) -> dict[str, int]:
        """Wait for every child. With `progress` (steps done so far), also measure the CPU
        seconds all children spend between step marks[0] and marks[1] (self.cpu)."""
        deadline = time.monotonic() + timeout
        self.cpu = CpuWindow()
        while any(proc.poll() is None for _, proc in self.procs):
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"run timed out after {timeout:.0f} s; logs in {self.log_dir}")
            if progress is not None and self.cpu.end is None:
                done = progress()
                if (self.cpu.start is None and done >= marks[0]) or (
                    self.cpu.start is not None and done >= marks[1]
                ):
                    self.cpu.mark(done, [proc.pid for _, proc in self.procs])
            time.sleep(0.01)
        return {name: proc.returncode for name, proc in self.procs}

    def kill(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the session we created for this child
                proc.wait()

    def check(self, codes: dict[str, int]) -> None:
        bad = {name: code for name, code in codes.items() if code != 0}
        if bad:
            tails = "\n".join(
                f"--- {name}.log\n{tail(self.log_dir / f'{name}.log')}" for name in bad
            )
            raise RuntimeError(f"processes failed {bad}; logs in {self.log_dir}\n{tails}")


class CpuWindow:
    """CPU seconds (user + system, all threads) of a set of processes between two step marks,
    from /proc: unlike wall time, it barely moves when other jobs share the cores."""

    def __init__(self) -> None:
        self.start: tuple[int, float] | None = None
        self.end: tuple[int, float] | None = None

    def mark(self, step: int, pids: list[int]) -> None:
        total = 0.0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                self.end = self.start = None  # a process is gone: no clean window
                return
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if self.start is None:
            self.start = (step, total)
        else:
            self.end = (step, total)

    def per_step(self) -> float:
        if self.start is None or self.end is None or self.end[0] <= self.start[0]:
            return float("nan")
        return (self.end[1] - self.start[1]) / (self.end[0] - self.start[0])


def cpu_marks(steps: int) -> tuple[int, int]:
    """The CPU window: after warm-up to just before the last step (eval and exit excluded)."""
    return min(5, steps // 4), steps - 1


def step_counter(path: Path) -> Callable[[], int]:
    """How many step events a metrics file holds so far (for ProcessGroup.wait marks); each
    call parses only what the file gained since the last."""
    stream, offset, steps = RecordStream(str(path)), 0, 0

    def count() -> int:
        nonlocal offset, steps
        try:
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
        except OSError:
            return steps
        offset += len(chunk)
        steps += sum(1 for record in stream.feed(chunk) if record["event"] == "step")
        return steps

    return count


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def read_events(path: Path) -> list[Any]:
    """The file's records, checked against smolcluster/events.py."""
    return list(read_records(path))


def of(events: list[Any], kind: str) -> list[Any]:
    return of_kind(events, kind)


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


def python() -> str:
    return sys.executable
