"""Workers and the server die, join and come back; the run still completes."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from smolcluster.harness import LocalCluster
from smolcluster.protocol import client_handshake

pytestmark = pytest.mark.slow


def baseline_accuracy(cluster: LocalCluster) -> float:
    assert cluster.spawn("local", "local").wait(timeout=600) == 0, cluster.log("local")
    return cluster.summary("local")["final_accuracy"]


def test_a_worker_the_server_still_thinks_connected_dials_until_it_is_let_in(
    tmp_path: Path, offline_digits_root: Path
) -> None:
    # A worker whose connection died on its side redials before the server has noticed; the
    # server's REJECT must be one the worker retries, not one that ends it.
    cluster = LocalCluster(
        tmp_path, offline_digits_root, workers=1, cluster={"join_timeout_s": 60.0}
    )
    host = cluster.workers[0]
    cluster.spawn("mini1", "server")
    cluster.wait_for_server_port()
    ghost = socket.create_connection(("127.0.0.1", cluster.port))  # its old connection
    hello = {"host": host, "rank": 1, "role": "worker", "mode": "sync"}
    conn, _ = client_handshake(ghost, cluster.secret, hello, 1 << 26, "ghost")
    cluster.spawn(host, "worker", "--host", host)
    deadline = time.monotonic() + 120
    while "already connected" not in cluster.log(host):
        assert cluster.procs[host].poll() is None, cluster.logs()
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.1)
    conn.close()  # now the server learns the old connection is gone
    assert cluster.wait(timeout=300) == {"mini1": 0, host: 0}, cluster.logs()
    assert cluster.summary()["workers"][host]["steps"] == cluster.summary()["steps"]


def test_sync_run_survives_a_killed_worker(tmp_path: Path, offline_digits_root: Path) -> None:
    cluster = LocalCluster(
        tmp_path,
        offline_digits_root,
        workers=3,
        cluster={"step_timeout_s": 30.0},
        nn={"num_epochs": 2, "lr_schedule": "cosine"},
    )
    cluster.start()
    total = 2 * (9000 // 3 // 32)
    cluster.wait_for_step(int(total * 0.4))
    cluster.procs["mini3"].send_signal(signal.SIGKILL)
    codes = cluster.wait()
    assert codes["mini1"] == 0 and codes["mini2"] == 0 and codes["pi5"] == 0, cluster.logs()
    summary = cluster.summary()
    assert summary["steps"] == total
    assert "dropped mini3(rank 2)" in cluster.log("mini1")
    left = [m for m in cluster.events("mini1", "member") if m["change"] == "left"]
    assert [m["host"] for m in left] == ["mini3"] and left[0]["workers"] == 2, left
    # After the drop two workers answer, and mini2 (first survivor) also computes mini3's
    # batch, so every step keeps the planned 3 x 32 samples from the planned shards.
    last = cluster.events("mini1", "step")[-1]
    assert last["workers"] == 2
    assert last["batch_sizes"] == {"mini2": 64, "pi5": 32}
    # Only the step mini3 died in lacks its batch; with the cosine schedule the final weights
    # settle, so the run ends where the uninterrupted one does (replays: within 0.3 point).
    assert abs(summary["final_accuracy"] - baseline_accuracy(cluster)) <= 0.01


def test_elastic_run_loses_nothing_to_a_killed_worker(
    tmp_path: Path, offline_digits_root: Path
) -> None:
    """3 elastic workers, one SIGKILLed at 40 % of the sample budget, against the same run
    uninterrupted: the survivors make up the budget and the accuracy is not worse."""

    def elastic_run(name: str) -> LocalCluster:
        return LocalCluster(
            tmp_path / name,
            offline_digits_root,
            workers=3,
            cluster={
                "mode": "elastic",
                "worker_update_interval": 10,
                "heartbeat_interval_s": 0.5,
                "heartbeat_timeout_s": 30.0,
            },
            nn={"num_epochs": 2, "lr_schedule": "cosine"},
        )

    whole = elastic_run("uninterrupted")
    whole.start()
    assert set(whole.wait().values()) == {0}, whole.logs()
    budget = 2 * (9000 // 3 // 32) * 3 * 32

    cluster = elastic_run("killed")
    cluster.start()
    cluster.wait_for(cluster.server, lambda e: e["samples"] >= 0.4 * budget, "40 % of the budget")
    cluster.procs["mini3"].send_signal(signal.SIGKILL)
    codes = cluster.wait()
    assert codes["mini1"] == codes["mini2"] == codes["pi5"] == 0, cluster.logs()
    summary = cluster.summary()
    assert "dropped mini3(rank 2)" in cluster.log("mini1")
    assert summary["samples"] >= budget
    # Measured (docs/algorithms.md): killed runs end 0.5-1.4 points *above* uninterrupted ones
    # (0.918, 0.922 vs 0.908, 0.913): two workers' pushes are staler by less. Elastic runs are
    # not bit-reproducible, so the check is one-sided: the death costs at most 1 point.
    assert summary["final_accuracy"] >= whole.summary()["final_accuracy"] - 0.01, summary


def test_elastic_run_survives_a_killed_worker_and_counts_a_joiner(
    tmp_path: Path, offline_digits_root: Path
) -> None:
    cluster = LocalCluster(
        tmp_path,
        offline_digits_root,
        workers=4,
        cluster={
            "mode": "elastic",
            "worker_update_interval": 20,
            "min_workers": 3,
            "heartbeat_interval_s": 0.5,
            "heartbeat_timeout_s": 30.0,
        },
        nn={"num_epochs": 2},
    )
    cluster.spawn("mini1", "server")
    for host in ("mini2", "mini3", "pi5"):
        cluster.spawn(host, "worker", "--host", host, "--throttle-s", "0.25")
    cluster.wait_for_step(1)
    cluster.spawn("pi4", "worker", "--host", "pi4")  # a 4th worker, mid-run
    cluster.wait_for_step(10)
    cluster.procs["mini3"].send_signal(signal.SIGKILL)  # about 40 % of the way
    codes = cluster.wait()
    assert codes["mini1"] == codes["mini2"] == codes["pi5"] == codes["pi4"] == 0, cluster.logs()
    summary = cluster.summary()
    merges = cluster.events("mini1", "step")
    assert any(m["host"] == "pi4" for m in merges), "the joiner's updates were not merged"
    members = [(m["host"], m["change"]) for m in cluster.events("mini1", "member")]
    assert ("pi4", "started") in members and ("mini3", "left") in members, members
    first = next(m for m in merges if m["host"] == "pi4")
    assert first["step"] > 1 and first["staleness"] <= 3  # joined mid-run with fresh weights
    assert summary["workers"]["pi4"]["samples"] > 0
    assert "dropped mini3(rank 2)" in cluster.log("mini1")
    assert summary["samples"] >= 2 * (9000 // 4 // 32) * 4 * 32
    assert summary["final_accuracy"] > 0.85, summary


def test_server_killed_and_resumed_keeps_the_workers(
    tmp_path: Path, offline_digits_root: Path
) -> None:
    every = 10
    cluster = LocalCluster(
        tmp_path,
        offline_digits_root,
        workers=2,
        cluster={"checkpoint_every": every, "connect_backoff_s": 1.0, "connect_retries": 600},
        nn={"max_steps": 80, "eval_steps": 40},
    )
    cluster.start()
    cluster.wait_for_step(35)
    cluster.procs["mini1"].send_signal(signal.SIGKILL)
    cluster.procs["mini1"].wait()
    killed_at = cluster.events("mini1", "step")[-1]["step"]
    cluster.spawn("mini1", "server", "--resume")
    codes = cluster.wait()
    assert set(codes.values()) == {0}, cluster.logs()
    steps = [e["step"] for e in cluster.events("mini1", "step")]
    resumed_at = steps[steps.index(killed_at) + 1] - 1
    assert killed_at - resumed_at <= every  # at most N steps redone
    assert steps[steps.index(killed_at) + 1 :] == list(range(resumed_at + 1, 81))
    assert cluster.summary()["steps"] == 80
    assert "resumed from" in cluster.log("mini1")
    for host in cluster.workers:  # the same worker processes carried on
        assert "reconnecting" in cluster.log(host) or "lost the server" in cluster.log(host)
        assert cluster.procs[host].returncode == 0


def test_sigterm_checkpoints_before_exit(tmp_path: Path, offline_digits_root: Path) -> None:
    cluster = LocalCluster(
        tmp_path,
        offline_digits_root,
        workers=1,
        cluster={"checkpoint_every": 1000},
        nn={"max_steps": 500},
    )
    cluster.start()
    cluster.wait_for_step(5)
    cluster.procs["mini1"].send_signal(signal.SIGTERM)
    assert cluster.procs["mini1"].wait(timeout=120) == 0
    cluster.procs["mini2"].kill()
    import torch

    state = torch.load(tmp_path / "checkpoints" / "mini1.pt", weights_only=True)
    assert state["step"] >= 5
    assert "stopped by SIGTERM" in cluster.log("mini1")
