"""Pure exchange microbenchmark: averaging B bytes of fp32 across N processes, nothing else.

ours: N workers and a server on loopback speak smolcluster.protocol exactly as a sync step does:
the authenticated handshake, then per iteration each worker sends one GRADS frame (HMAC'd) and
receives the AVERAGE straight into its buffer; the server receives each frame into a preallocated
buffer, checks it is finite, sums, divides and sends the average back. The real server adds a
reader thread per connection and a queue hand-off; that cost shows up in the end-to-end rows.
gloo: the same N processes call dist.all_reduce on a tensor of B bytes.
Both time the steady-state loop: seconds between consecutive completed exchanges.

Run by benchmarks.run; by hand: python -m benchmarks.exchange --n 3 --bytes 1356840
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    LOOPBACK,
    ProcessGroup,
    child_env,
    free_port_pair,
    median,
    percentile,
    python,
)

MAX_FRAME = 1 << 30


def _gloo_rank(a: argparse.Namespace) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{LOOPBACK}:{a.port}",
        rank=a.rank,
        world_size=a.n,
        timeout=timedelta(seconds=120),
    )
    tensor = torch.ones(a.bytes // 4)
    times = []
    for i in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        dist.all_reduce(tensor)
        tensor.div_(a.n)  # an average, like ours
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    dist.barrier()
    dist.destroy_process_group()
    if a.rank == 0:
        Path(a.out).write_text(json.dumps({"times": times}))


def _ours_server(a: argparse.Namespace) -> None:
    from smolcluster.protocol import MsgType, payload_digest, read_secret, server_handshake

    secret = read_secret(Path(a.secret))
    numel = a.bytes // 4
    listener = socket.create_server((LOOPBACK, a.port))
    conns = []
    while len(conns) < a.n:
        sock, addr = listener.accept()
        conn, _hello = server_handshake(sock, secret, MAX_FRAME, f"{addr[0]}:{addr[1]}")
        conn.send(MsgType.WELCOME, {})
        conns.append(conn)
    listener.close()
    buffers = [torch.empty(numel) for _ in conns]
    total, average = torch.empty(numel), torch.empty(numel)
    for step in range(a.warmup + a.iters):
        total.zero_()
        samples = 0
        for conn, buf in zip(conns, buffers, strict=True):
            frame = conn.expect(MsgType.GRADS, into={MsgType.GRADS: memoryview(buf.numpy())})
            if not torch.isfinite(buf.sum()):
                raise SystemExit("non-finite gradients")
            n = frame.meta["samples"]
            total.add_(buf, alpha=n)
            samples += n
        torch.div(total, samples, out=average)
        digest = payload_digest(average.numpy())  # hashed once for all N frames, as the server
        for conn in conns:
            conn.send(MsgType.AVERAGE, {"step": step}, average.numpy(), digest=digest)
    for conn in conns:
        conn.expect(MsgType.BYE)
        conn.close()


def _ours_worker(a: argparse.Namespace) -> None:
    from smolcluster.protocol import MsgType, client_handshake, read_secret

    secret = read_secret(Path(a.secret))
    for _ in range(200):
        try:
            sock = socket.create_connection((LOOPBACK, a.port), timeout=30)
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise SystemExit("server never came up")
    conn, _ = client_handshake(
        sock, secret, {"host": f"w{a.rank}", "rank": a.rank}, MAX_FRAME, "server"
    )  # the connection keeps its socket non-blocking and waits with its own deadlines
    grads = torch.full((a.bytes // 4,), float(a.rank))
    average = torch.empty_like(grads)
    times = []
    last = time.perf_counter()
    for step in range(a.warmup + a.iters):
        conn.send(MsgType.GRADS, {"step": step, "samples": 32, "loss": 0.0}, grads.numpy())
        conn.expect(MsgType.AVERAGE, into={MsgType.AVERAGE: memoryview(average.numpy())})
        now = time.perf_counter()
        if step >= a.warmup:
            times.append(now - last)
        last = now
    conn.send(MsgType.BYE, {})
    conn.close()
    if a.rank == 1:
        Path(a.out).write_text(
            json.dumps(
                {"times": times, "bytes_sent": conn.bytes_sent, "bytes_recv": conn.bytes_recv}
            )
        )


def measure(
    kind: str,
    n: int,
    nbytes: int,
    iters: int,
    work: Path,
    threads: int = 1,
    warmup: int = 5,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Median/p90 seconds per exchange of `nbytes` among n processes ('ours' or 'gloo')."""
    from smolcluster.protocol import write_secret

    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{kind}-{n}-{nbytes}.json"
    port = free_port_pair()
    common = [
        "--n",
        str(n),
        "--bytes",
        str(nbytes),
        "--iters",
        str(iters),
        "--warmup",
        str(warmup),
        "--port",
        str(port),
        "--out",
        str(out),
    ]
    group = ProcessGroup(work / "logs" / f"{kind}-{n}-{nbytes}", child_env(threads))
    me = [python(), "-m", "benchmarks.exchange"]
    if kind == "gloo":
        for rank in range(n):
            group.start(f"rank{rank}", [*me, "--role", "gloo", "--rank", str(rank), *common])
    else:
        secret = work / "secret"
        if not secret.exists():
            write_secret(secret)
        common += ["--secret", str(secret)]
        group.start("server", [*me, "--role", "server", *common])
        for rank in range(1, n + 1):
            group.start(f"w{rank}", [*me, "--role", "worker", "--rank", str(rank), *common])
    group.check(group.wait(timeout))
    data = json.loads(out.read_text())
    times = data["times"]
    result = {
        "kind": kind,
        "n": n,
        "bytes": nbytes,
        "iters": len(times),
        "median_s": median(times),
        "p90_s": percentile(times, 90),
    }
    if "bytes_sent" in data:
        per_iter = warmup + iters
        result["wire_ratio"] = data["bytes_sent"] / per_iter / nbytes
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.exchange")
    p.add_argument("--role", choices=["gloo", "server", "worker"])
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--bytes", type=int, default=1_356_840)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--port", type=int)
    p.add_argument("--out")
    p.add_argument("--secret")
    a = p.parse_args(argv)
    if a.role == "gloo":
        _gloo_rank(a)
    elif a.role == "server":
        _ours_server(a)
    elif a.role == "worker":
        _ours_worker(a)
    else:  # by hand: both, side by side
        with tempfile.TemporaryDirectory() as tmp:
            for kind in ("ours", "gloo"):
                r = measure(kind, a.n, a.bytes, a.iters, Path(tmp))
                print(
                    f"{kind:5} n={a.n} {a.bytes} B: median {1e3 * r['median_s']:.3f} ms, "
                    f"p90 {1e3 * r['p90_s']:.3f} ms"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
