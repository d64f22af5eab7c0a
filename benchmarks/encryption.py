"""What encryption costs a sync step: protocol 3 seals every frame, there is no switch to
compare with, so the seal and open passes are timed on their own and divided by the step.

Per step the server opens N sealed GRADS and seals one AVERAGE for all workers
(`Broadcast.seal`, the trainer's own code); a worker seals its GRADS and opens the AVERAGE.
Open is ChaCha20-Poly1305 `decrypt_into`, the call `Connection` makes, on the same sizes. The
per-frame metadata (tens of bytes) is left out. The share is an upper bound of the slowdown:
it assumes every pass is on the step's critical path (the server's reader threads open
GRADS while it waits for the slowest worker).
"""

from __future__ import annotations

import os
import time
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from benchmarks.common import fmt, median, table
from smolcluster.protocol import SEAL_TAG, Broadcast, MsgType

GOAL = 0.05  # issue 14: encryption on at most 5 % slower


def seal_open_s(nbytes: int, iters: int) -> tuple[float, float]:
    """Median seconds of one seal (Broadcast.seal) and one open of `nbytes`."""
    payload, broadcast = os.urandom(nbytes), Broadcast()
    aead, nonce = ChaCha20Poly1305(broadcast.key), os.urandom(12)
    sealed = bytearray(nbytes + SEAL_TAG)
    aead.encrypt_into(nonce, payload, b"", sealed)
    out, seals, opens = bytearray(nbytes), [], []
    for step in range(iters):
        t0 = time.perf_counter()
        broadcast.seal(MsgType.AVERAGE, step, payload)
        t1 = time.perf_counter()
        aead.decrypt_into(nonce, sealed, b"", out)
        opens.append(time.perf_counter() - t1)
        seals.append(t1 - t0)
    return median(seals), median(opens)


def measure(nbytes: int, step_s: dict[int, float], iters: int = 50) -> list[dict[str, Any]]:
    """One row per N: crypto seconds per step against that N's sync fp32 step time."""
    seal, open_ = seal_open_s(nbytes, iters)
    rows = []
    for n, step in sorted(step_s.items()):
        server, worker = seal + n * open_, seal + open_
        rows.append({"n": n, "bytes": nbytes, "seal_s": seal, "open_s": open_, "step_s": step,
                     "server_share": server / step, "worker_share": worker / step})  # fmt: skip
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    cells = [
        [str(r["n"]), f"{r['bytes']:,}", fmt(1e3 * r["seal_s"], ".2f"),
         fmt(1e3 * r["open_s"], ".2f"), fmt(1e3 * r["step_s"]),
         fmt(100 * r["server_share"]), fmt(100 * r["worker_share"]),
         "met" if r["server_share"] <= GOAL else "MISSED"]
        for r in rows
    ]  # fmt: skip
    header = (
        "N|payload B|seal ms|open ms|sync fp32 step ms p50|server: (seal + N open) ÷ step %|"
        f"worker: (seal + open) ÷ step %|≤ {GOAL:.0%}"
    )
    return table(header, cells)
