"""Interleaved A/B of trainer checkouts: steady-state CPU per sync step (issue 14, item 2).

    git archive <commit> smolcluster | tar -x -C /tmp/before
    PYTHONPATH=. .venv/bin/python notes/issue14_cpu_ab.py 3 fp32 /tmp/before /tmp/after

Each round runs every checkout once: the real server + 3 workers (benchmarks.runs.socket_cluster,
sync, batch 32, one thread each, loopback, 300 steps), and sums utime + stime from /proc of the
four processes between the server's step 40 and step 240. CPU time moves far less than wall
time when other jobs share the cores. Kept here, not in benchmarks/, while that is restructured.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

from benchmarks.common import default_data_root, prepare_data
from benchmarks.runs import socket_cluster
from smolcluster.harness import SERVER

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def run(code: str, out: Path, data_root: Path, int8: bool) -> tuple[float, float]:
    """(CPU ms per step of all four processes, the server's median step time in ms)."""
    env = {"PYTHONPATH": os.pathsep.join([code, os.getcwd()])}
    extra = {"use_quantization": True} if int8 else None
    cluster = socket_cluster(out, 3, data_root, steps=300, epochs=4, env=env, extra=extra)
    cluster.start()
    cluster.wait_for_step(40)
    pids = cluster.pids()
    first = cpu_s(pids)
    cluster.wait_for_step(240)
    last = cpu_s(pids)
    cluster.wait(600, check=True)
    times = [e["step_time_s"] for e in cluster.events(SERVER, "step")][40:240]
    return (last - first) / 200 * 1e3, statistics.median(times) * 1e3


def main() -> None:
    rounds, int8, codes = int(sys.argv[1]), sys.argv[2] == "int8", sys.argv[3:]
    data_root = default_data_root().resolve()
    prepare_data(data_root)
    results: dict[str, list[tuple[float, float]]] = {code: [] for code in codes}
    work = Path(os.environ.get("AB_WORK", "/tmp/issue14-ab"))
    for r in range(rounds):
        for i, code in enumerate(codes):
            cpu, step = run(code, work / f"{os.getpid()}-{r}-{i}", data_root, int8)
            results[code].append((cpu, step))
            load = os.getloadavg()[0]
            print(f"round {r} {code}: CPU {cpu:.1f} ms/step, server step p50 {step:.1f} ms, "
                  f"load {load:.1f}", flush=True)  # fmt: skip
    for code, rows in results.items():
        cpu = statistics.median(c for c, _ in rows)
        step = statistics.median(s for _, s in rows)
        print(f"{code}: CPU ms/step median {cpu:.2f}, server step p50 median {step:.1f}")


if __name__ == "__main__":
    main()
