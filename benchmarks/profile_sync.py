"""Where a sync step's time goes, per process: py-spy over a real N-worker run on loopback.

    python -m benchmarks.run --only profile                 # N=3, 8 s window, this checkout
    python -m benchmarks.run --only profile --code A B A B  # checkouts' trainers, interleaved

After 20 steps py-spy records the server and the first worker (`--idle --threads`); each
sample goes to a thread kind (LOOPS: a frame only that kind has) and to the first bucket
(BUCKETS) one of its frames matches, leaf first, so waiting is a bucket too. The step timers
are the JSONL metrics' medians over the same window (docs/benchmarks.md, "Where a sync step's
time goes").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from collections import Counter
from pathlib import Path

from benchmarks.common import code_env, median, table
from benchmarks.runs import socket_cluster


def fn(*names: str) -> str:
    """A frame of one of these functions or methods: py-spy writes `Class.name (file:line)`."""
    return rf"(^|\.)({'|'.join(names)}) \("


# (bucket, regex over one frame), tried from the leaf of a stack up.
BUCKETS = [
    ("hashing (SHA-256, HMAC)", fn("payload_digest", "openssl_sha256", "_mac_key") + "|hmac\\.py"),
    ("AEAD seal/open (the run's cipher)", fn("_seal_payload", "_recv_sealed_frame", "seal",
                                             "_open_broadcast", "encrypt", "decrypt")),
    ("waiting (poll, queue get, lock)", fn("_wait", "wait", "get") + r"|queue\.py:1[0-9]{2}\)"),
    ("recv_into (kernel copy in)", fn("_recv_exact", "recv_into")),
    ("sendmsg (kernel copy out)", fn("_sendmsg", "sendmsg")),
    ("queue hand-off (put)", fn("put")),
    ("Adam step", fn("step") + r".*replica\.py"),
    ("forward + backward", fn("compute_gradients")),
    ("average (weighted sum)", fn("average_into_grads")),
    ("checks + decode (isfinite, codec)", fn("gradients", "read", "round_trip", "decode")),
    ("checksum", fn("checksum")),
    ("metrics + JSON", r"metrics\.py|json/"),
]  # fmt: skip
OTHER = "other Python (frames, dispatch)"
LOOPS = {  # thread kind -> a frame only that kind of thread has on its stack
    "server main": fn("run") + r".*smolcluster/sync\.py",
    "server readers": fn("_serve_connection"),
    "worker main": fn("_session") + r".*smolcluster/worker\.py",
}


def bucket(frames: list[str]) -> str:
    for frame in reversed(frames):  # leaf first
        for name, pattern in BUCKETS:
            if re.search(pattern, frame):
                return name
    return OTHER


def read_profile(path: Path, kinds: list[str]) -> dict[str, Counter[str]]:
    """py-spy's raw (collapsed) output -> samples per bucket, per thread kind of `kinds`."""
    shares: dict[str, Counter[str]] = {kind: Counter() for kind in kinds}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.strip() for f in stack.split(";")]
        for kind in kinds:
            if any(re.search(LOOPS[kind], f) for f in frames):
                shares[kind][bucket(frames)] += int(count)
                break
    return shares


def pyspy_path() -> Path | None:
    """py-spy (the dev extra) on PATH or next to this interpreter, else None."""
    found = shutil.which("py-spy") or shutil.which("py-spy", path=Path(sys.executable).parent)
    return Path(found) if found else None


def measure(a: Namespace, work: Path) -> list[str]:
    """The profile part of benchmarks.run: one breakdown per --code checkout, at N=3."""
    if pyspy_path() is None:
        return ["skipped: py-spy is not installed (the dev extra)"]
    texts = []
    for i, code in enumerate(a.code):
        print(f"  profile of {code} ({a.profile_seconds:.0f} s)", flush=True)
        texts.append(profile(code, 3, a.profile_seconds, 250, work / str(i), a.data_root))
    return texts


def report(texts: list[str], a: Namespace) -> str:
    title = "## Where a sync step's time goes, per process (py-spy)"
    return "\n\n".join(f"{title}\n\n{text}" for text in texts)


def profile(code: Path, n: int, seconds: float, rate: int, work: Path, data_root: Path) -> str:
    """Start a long run, attach py-spy to the server and one worker for `seconds` once 20
    steps are done (so start-up and joining are not in the window), then stop the run."""
    pyspy = str(pyspy_path())
    cluster = socket_cluster(
        work / "run", n, data_root, steps=100_000, epochs=100, env=code_env(code)
    )
    worker = cluster.workers[0]
    try:
        cluster.start()
        cluster.wait_for_step(20)
        record = ["record", "--idle", "--threads", "--nonblocking", "--rate", str(rate)]
        spies = [
            subprocess.Popen(
                [pyspy, *record, "--duration", str(round(seconds)), "--format", "raw",
                 "-o", str(work / f"{host}.txt"), "--pid", str(cluster.procs[host].pid)],
                stdout=subprocess.DEVNULL,
                stderr=(work / f"{host}.py-spy.log").open("w"),
            )
            for host in ("mini1", worker)
        ]  # fmt: skip
        first = len(cluster.events("mini1", "step"))
        worker_first = len(cluster.events(worker, "step"))
        for spy in spies:
            spy.wait(timeout=seconds + 60)
        server_steps = cluster.events("mini1", "step")[first:]
        worker_steps = cluster.events(worker, "step")[worker_first:]
    finally:
        cluster.stop()
    timers = {
        "server step_time_s": median([e["step_time_s"] for e in server_steps]),
        f"{worker} compute_s": median([e["compute_s"] for e in worker_steps]),
        f"{worker} wait_s": median([e["wait_s"] for e in worker_steps]),
    }
    profiles = read_profile(work / "mini1.txt", ["server main", "server readers"])
    profiles |= read_profile(work / f"{worker}.txt", ["worker main"])
    waiting = BUCKETS[2][0]
    rows = []
    for name in [*(name for name, _ in BUCKETS), OTHER]:
        cells = []
        for c in profiles.values():
            share = f"{100 * c[name] / max(1, sum(c.values())):.1f}"
            busy = f" ({100 * c[name] / max(1, sum(c.values()) - c[waiting]):.0f})"
            cells.append(share if name == waiting else share + busy)
        if any(c[name] for c in profiles.values()):
            rows.append([name, *cells])
    rows.append(["samples", *(str(sum(c.values())) for c in profiles.values())])
    return "\n".join([
        f"sync fp32, N={n}, py-spy {rate} Hz for {seconds:.0f} s ({len(server_steps)} steps),"
        f" code {code}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        "% of the thread's samples (in brackets: % of its busy samples, i.e. not waiting)",
        "",
        table("bucket|" + "|".join(profiles), rows),
        "",
        "step timers (median over the window, ms): "
        + ", ".join(f"{k} {1000 * v:.2f}" for k, v in timers.items()),
    ])  # fmt: skip
