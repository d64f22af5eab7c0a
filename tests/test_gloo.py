"""`backend: gloo`: torch.distributed DDP ranks as real processes on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from smolcluster.events import of_kind, read_records
from smolcluster.gloo_backend import GlooRun, gloo_ifname
from tests.cluster import LocalCluster

REPO = Path(__file__).resolve().parents[1]


def _free_port_pair() -> int:
    """p and p + 1 free: gloo's rendezvous listens on the cluster port + 1."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def _events(path: Path, kind: str) -> list[Any]:
    return of_kind(read_records(path), kind)


def _run_ranks(tmp_path: Path, data_root: Path, world: int, *extra: str) -> dict[int, str]:
    port = _free_port_pair()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(world):
        log = (tmp_path / f"rank{rank}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "smolcluster.gloo_backend",
                    "--master-addr",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--world-size",
                    str(world),
                    "--rank",
                    str(rank),
                    "--data-root",
                    str(data_root),
                    "--metrics-dir",
                    str(tmp_path / "metrics"),
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        )
    logs = {}
    try:
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        logs[rank] = (tmp_path / f"rank{rank}.log").read_text(errors="replace")
        assert proc.returncode == 0, f"rank {rank} failed:\n{logs[rank][-3000:]}"
    return logs


@pytest.mark.slow
def test_three_ranks_learn_and_end_identical(tmp_path: Path, offline_digits_root: Path) -> None:
    logs = _run_ranks(tmp_path, offline_digits_root, 3, "--max-steps", "60", "--eval-steps", "20")
    metrics = tmp_path / "metrics"
    lead = _events(metrics / "rank0.jsonl", "summary")[-1]
    evals = _events(metrics / "rank0.jsonl", "eval")
    assert [e["step"] for e in evals] == [20, 40, 60]
    # Ten classes: chance is 0.1. Sixty steps of 3 x 32 digits get well past 0.5.
    assert lead["final_accuracy"] > 0.5, lead
    assert lead["final_accuracy"] == evals[-1]["val_accuracy"]
    assert "offline digits" in lead["dataset"] and "offline digits" in logs[0]
    assert lead["steps"] == 60 and lead["cluster_samples"] == 3 * 60 * 32
    assert set(lead["workers"]) == {"rank1", "rank2"}
    # DDP keeps replicas bit-identical: every rank's final parameters hash the same.
    digests = {_events(metrics / f"rank{r}.jsonl", "summary")[-1]["param_sha256"] for r in range(3)}
    assert len(digests) == 1
    assert lead["replicas_identical"] is True
    for rank in range(3):
        steps = _events(metrics / f"rank{rank}.jsonl", "step")
        assert [s["step"] for s in steps] == list(range(1, 61))
        assert all(s["step_time_s"] > 0 and s["bytes_sent"] > 0 for s in steps)
    weights = torch.load(metrics / "rank0-model.pt", weights_only=True)
    assert "net.1.weight" in weights


@pytest.mark.slow
def test_backend_gloo_through_the_cli(tmp_path: Path, offline_digits_root: Path) -> None:
    """`smolcluster server/worker` with backend: gloo write the socket trainer's metrics."""
    cluster = LocalCluster(
        tmp_path,
        offline_digits_root,
        workers=2,
        cluster={"backend": "gloo", "port": _free_port_pair()},
        nn={"max_steps": 40, "eval_steps": 20},
    )
    cluster.start()
    assert cluster.wait() == {"mini1": 0, "mini2": 0, "mini3": 0}, cluster.logs()
    summary = cluster.summary("mini1")
    assert summary["role"] == "server" and summary["backend"] == "gloo"
    assert summary["steps"] == 40 and summary["final_accuracy"] > 0.5
    assert set(summary["workers"]) == {"mini2", "mini3"}
    for host in ("mini2", "mini3"):
        worker = cluster.summary(host)
        assert worker["role"] == "worker" and worker["steps"] == 40
        assert worker["param_sha256"] == summary["param_sha256"]
        assert summary["workers"][host]["samples"] == worker["samples"] == 40 * 32
    start = cluster.events("mini1", "start")[0]
    assert start["backend"] == "gloo" and start["total_steps"] == 40


def _run(**kw: Any) -> GlooRun:
    base = dict(
        master_addr="127.0.0.1",
        port=1,
        world_size=2,
        rank=0,
        hosts=["a", "b"],
        batch_size=1,
        lr=1e-3,
        epochs=1,
        eval_steps=1,
        data_root=Path("."),
        metrics_dir=Path("."),
    )
    return GlooRun(**{**base, **kw})


def test_interface_choice() -> None:
    loopback = "lo0" if sys.platform == "darwin" else "lo"
    assert gloo_ifname(_run()) == loopback
    assert gloo_ifname(_run(master_addr="localhost")) == loopback
    assert gloo_ifname(_run(master_addr="10.10.0.1", ifname="tb0")) == "tb0"
    # A real cluster address without a configured interface: gloo resolves the host name.
    assert gloo_ifname(_run(master_addr="10.10.0.1")) is None
