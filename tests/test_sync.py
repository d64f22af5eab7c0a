"""Synchronous training with real processes over real TCP on 127.0.0.1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from smolcluster.harness import LocalCluster

pytestmark = pytest.mark.slow


def _baseline(cluster: LocalCluster, *extra: str) -> dict:
    proc = cluster.spawn("local", "local", *extra)
    assert proc.wait(timeout=600) == 0, cluster.log("local")
    return cluster.summary("local")


def test_sync_matches_one_process_baseline(tmp_path: Path, offline_digits_root: Path) -> None:
    """3 workers at batch b end with the weights of one process stepping on the 3b batches,
    the learning rate following the same cosine schedule everywhere."""
    cluster = LocalCluster(
        tmp_path,
        offline_digits_root,
        workers=3,
        nn={"max_steps": 50, "eval_steps": 50, "lr_schedule": "cosine"},
    )
    cluster.start()
    codes = cluster.wait()
    assert codes == {"mini1": 0, "mini2": 0, "mini3": 0, "pi5": 0}, cluster.logs()
    _baseline(cluster)
    sync = torch.load(cluster.metrics_dir / "mini1-model.pt", weights_only=True)
    local = torch.load(cluster.metrics_dir / "local-model.pt", weights_only=True)
    assert sync.keys() == local.keys()
    # Bit for bit: the server sums the workers' gradients in the order the one process does.
    differ = {
        k: (sync[k] - local[k]).abs().max().item() for k in sync if not sync[k].equal(local[k])
    }
    assert not differ, differ
    # And the replicas never drifted apart: every checksum the workers sent matched.
    assert cluster.summary()["checksum_mismatches"] == 0
    assert cluster.summary()["steps"] == 50


def test_real_run_reaches_baseline_accuracy(tmp_path: Path, offline_digits_root: Path) -> None:
    """Server + 3 workers on the offline digits, with W&B offline, as a user would run it."""
    cluster = LocalCluster(
        tmp_path,
        offline_digits_root,
        workers=3,
        cluster={"wandb_mode": "offline"},
        nn={"num_epochs": 2, "eval_steps": 60, "track_gradients": True},
    )
    cluster.start()
    assert set(cluster.wait().values()) == {0}, cluster.logs()
    summary = cluster.summary()
    baseline = _baseline(cluster)
    assert summary["steps"] == baseline["steps"] == 2 * (9000 // 3 // 32)
    assert summary["final_accuracy"] > 0.85, summary
    assert abs(summary["final_accuracy"] - baseline["final_accuracy"]) <= 0.01
    assert "offline digits" in summary["dataset"]
    assert "offline digits" in cluster.log("mini1")  # every run's log says which data it used
    steps = cluster.events("mini1", "step")
    # The summary's rate is over the training time: the steps' own time and the evals between
    # them, not the wait for workers before the first step.
    trained_s = summary["samples"] / summary["samples_per_s"]
    assert 0.99 * sum(s["step_time_s"] for s in steps) <= trained_s <= summary["wall"]
    assert all("net.1.weight" in s["grad_norms"] for s in steps)
    # exchange_s is the part of the step before the server's own optimizer step.
    assert all(0 < s["exchange_s"] < s["step_time_s"] for s in steps)
    assert steps[-1]["bytes_sent"] > 0 and steps[-1]["bytes_recv"] > 0
    for host in cluster.workers:
        worker = cluster.summary(host)
        assert worker["steps"] == summary["steps"]
        assert summary["workers"][host]["samples"] == worker["samples"]
    runs = list((cluster.metrics_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 5, runs  # one W&B run per process and the baseline, written offline
    shutil.rmtree(cluster.metrics_dir / "wandb")
