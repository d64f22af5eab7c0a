"""`balance: auto`: sync batches sized by measured worker throughput."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from smolcluster.balance import Balancer, split_batch
from smolcluster.config import PACKAGED_CONFIGS, ClusterConfig, ConfigError, load_settings
from smolcluster.data import ShardLoader
from smolcluster.hub import Hub, Peer
from tests.cluster import LocalCluster

CLUSTER = yaml.safe_load((PACKAGED_CONFIGS / "cluster_config.yaml").read_text())
NN = yaml.safe_load((PACKAGED_CONFIGS / "nn_config.yaml").read_text())


def test_split_is_proportional_whole_and_at_least_one() -> None:
    assert split_batch(96, [None, None, None]) == [32, 32, 32]
    assert split_batch(96, [1000.0, 1000.0, 1000.0]) == [32, 32, 32]
    assert split_batch(96, [3000.0, 1000.0, None]) == [48, 16, 32]  # None: the mean
    slow = split_batch(96, [20000.0, 20000.0, 100.0])
    assert sum(slow) == 96 and slow[2] == 1 and abs(slow[0] - slow[1]) <= 1
    for rates in ([1.0, 2.0, 3.0], [5.0, 1e-9, 7.0], [0.3, 0.3, 0.4], [1.0]):
        for total in (len(rates), 7, 96, 1001):
            sizes = split_batch(total, rates)
            assert sum(sizes) == total and min(sizes) >= 1, (rates, total, sizes)
    with pytest.raises(ValueError):
        split_batch(2, [1.0, 1.0, 1.0])


def test_balancer_smooths_rates_and_keeps_cursors() -> None:
    balancer = Balancer(batch_size=32)
    assert balancer.cursor("mini2", 10) == 320  # a joiner starts where a plain run would be
    balancer.advance("mini2", 5)
    assert balancer.cursor("mini2", 99) == 325  # ... and a rejoiner where it stopped
    balancer.observe("mini2", 32, 0.01)
    balancer.observe("mini2", 32, 0.02)
    assert 1600 < balancer.rates["mini2"] < 3200
    balancer.observe("mini3", 32, 0.01)
    assert balancer.rates["mini2"] == pytest.approx(0.3 * 1600 + 0.7 * 3200)
    assert balancer.split(["mini2", "mini3"]) == [29, 35]  # 2720 : 3200 samples/s


def test_take_walks_the_epochs_and_matches_plain_batches() -> None:
    x = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(100)
    loader = ShardLoader(x, y, torch.arange(10, 40), batch_size=8, seed=3, rank=1)
    for i in range(3):  # drawing batch_size at a time from 0 gives the plain batches
        assert torch.equal(loader.take(8 * i, 8)[1], loader.batch(0, i)[1])
    _, across = loader.take(25, 10)  # 5 from the end of epoch 0, 5 from the start of epoch 1
    assert torch.equal(across, torch.cat([loader.order(0)[25:], loader.order(1)[:5]]))
    _, many = loader.take(0, 75)  # longer than the shard
    assert torch.equal(many, torch.cat([loader.order(0), loader.order(1), loader.order(2)[:15]]))


def _write(tmp_path: Path, text: str) -> tuple[Path, Path]:
    cluster_file, nn_file = tmp_path / "cluster.yaml", tmp_path / "nn.yaml"
    cluster_file.write_text(yaml.safe_dump(CLUSTER) + text)
    nn_file.write_text(yaml.safe_dump(NN))
    return cluster_file, nn_file


def test_bad_balance_value_names_the_key(tmp_path: Path) -> None:
    cluster_file, nn_file = _write(tmp_path, "balance: always\n")
    with pytest.raises(ConfigError) as error:
        load_settings(cluster_file, nn_file)
    assert error.value.key == "balance" and "'off' or 'auto'" in error.value.message
    files = ["--cluster-config", str(cluster_file), "--nn-config", str(nn_file)]
    command = [sys.executable, "-m", "smolcluster", "check-config", *files]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"smolcluster: error: {cluster_file}: balance: {error.value.message}"
    ]


def test_balance_values_and_where_auto_applies(tmp_path: Path) -> None:
    cluster_file, nn_file = _write(tmp_path, "balance: off\n")  # YAML reads a bare off as false
    assert load_settings(cluster_file, nn_file).cluster.balance == "off"
    assert load_settings(cluster_file, nn_file, {"balance": "auto"}).cluster.balance == "auto"
    with pytest.raises(ConfigError, match="balance: auto needs mode sync"):
        load_settings(cluster_file, nn_file, {"balance": "auto", "mode": "elastic"})


class _Conn:
    bytes_sent = bytes_recv = 0

    def close(self) -> None:
        pass


def test_per_host_rate_stops_counting_when_a_worker_left() -> None:
    hub = Hub(ClusterConfig.model_validate(CLUSTER), b"secret")  # bookkeeping, no sockets
    early, late = Peer(_Conn(), "mini2", 1), Peer(_Conn(), "mini3", 2)
    early.samples = late.samples = 1000
    now = time.monotonic()
    early.joined_at = late.joined_at = now - 10.0
    hub.active, hub.pending, hub.history = [early, late], [], [early, late]
    hub.drop(early, "test")
    early.left_at = now - 8.0  # it left 2 s after joining
    rows = hub.per_host()
    assert rows["mini2"]["samples_per_s"] == pytest.approx(500, rel=0.01)
    assert rows["mini3"]["samples_per_s"] == pytest.approx(100, rel=0.01)


@pytest.mark.slow
def test_throttled_worker_gets_a_smaller_batch(tmp_path: Path, offline_digits_root: Path) -> None:
    """3 workers, pi5 sleeping 0.1 s per 32 samples: its share shrinks, the run is still sync."""
    cluster = LocalCluster(
        tmp_path,
        offline_digits_root,
        workers=3,
        cluster={"balance": "auto", "throttle_s": {"pi5": 0.1}, "checksum_interval": 10},
        nn={"num_epochs": 1, "eval_steps": 100},
    )
    cluster.start()
    assert set(cluster.wait().values()) == {0}, cluster.logs()
    summary = cluster.summary()
    total = 9000 // 3 // 32
    assert summary["steps"] == total
    assert summary["checksum_mismatches"] == 0  # replicas stayed identical
    assert summary["samples"] == total * 3 * 32  # the same samples per step as without balance
    assert summary["final_accuracy"] > 0.8, summary
    steps = cluster.events("mini1", "step")
    assert all(sum(s["batch_sizes"].values()) == 96 for s in steps)
    assert steps[0]["batch_sizes"] == {"mini2": 32, "mini3": 32, "pi5": 32}  # nothing measured
    later = steps[len(steps) // 2 :]

    def mean(host: str) -> float:
        return sum(s["batch_sizes"][host] for s in later) / len(later)

    split = [s["batch_sizes"] for s in later]
    assert mean("pi5") < 0.25 * min(mean("mini2"), mean("mini3")), split
    for host in cluster.workers:  # what each worker drew is what the server counted
        worker = cluster.summary(host)
        assert worker["samples"] == summary["workers"][host]["samples"]
        drawn = [e["samples"] for e in cluster.events(host, "step")]
        assert drawn == [s["batch_sizes"][host] for s in steps]
