"""The run plan every process derives identically: shards, step count and batch of each step."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from smolcluster.config import Settings
from smolcluster.data import ShardLoader, dataset_info, partition, read_rows, split_size

log = logging.getLogger("smolcluster")


@dataclass
class Plan:
    steps_per_epoch: int
    total_steps: int
    dataset: str

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.steps_per_epoch)


def shard_count(settings: Settings) -> int:
    return settings.cluster.num_workers + int(settings.cluster.server_trains)


def shard_index(settings: Settings, rank: int) -> int:
    """Rank 0 is the server; its shard exists only when it trains."""
    return rank if settings.cluster.server_trains else rank - 1


def make_plan(settings: Settings, train_samples: int) -> Plan:
    parts = shard_count(settings)
    smallest = train_samples // parts
    steps_per_epoch = smallest // settings.nn.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"a shard of {smallest} samples holds no batch of {settings.nn.batch_size}"
        )
    total = steps_per_epoch * settings.nn.num_epochs
    if settings.nn.max_steps is not None:
        total = min(total, settings.nn.max_steps)
    return Plan(steps_per_epoch, total, dataset_info(settings.data_root).source)


def train_size(settings: Settings) -> int:
    return split_size(settings.data_root, train=True)


def shard_loader(settings: Settings, rank: int) -> ShardLoader:
    """A rank's shard, read from disk: a process holds only the shards it trains on."""
    shards = partition(train_size(settings), shard_count(settings), settings.cluster.seed)
    return ShardLoader.read(
        settings.data_root,
        shards[shard_index(settings, rank)],
        settings.nn.batch_size,
        settings.cluster.seed,
        rank,
    )


def load_test(settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split with images as uint8 (7.8 MB for MNIST); `evaluate` converts per batch."""
    return read_rows(settings.data_root, train=False)
