"""Trainers hold only their shard, as uint8, and the model still sees the very same floats."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torchvision.datasets import MNIST

from smolcluster.data import (
    TRAIN_IMAGES,
    DataError,
    ShardLoader,
    evaluate,
    load_split,
    partition,
    read_rows,
    split_size,
    to_model_input,
)
from smolcluster.model import build_model


@pytest.fixture(scope="module")
def float_train(offline_digits_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training split as float32, the representation every trainer held before."""
    return load_split(offline_digits_root, train=True)


def test_uint8_rows_match_torchvisions_reader(offline_digits_root: Path) -> None:
    ds = MNIST(str(offline_digits_root), train=True, download=False)
    shard = partition(len(ds.data), 3, seed=42)[1]
    x, y = read_rows(offline_digits_root, True, shard)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, ds.data[shard]) and torch.equal(y, ds.targets[shard])
    x_all, y_all = read_rows(offline_digits_root, False)  # indices None: the whole split
    test = MNIST(str(offline_digits_root), train=False, download=False)
    assert torch.equal(x_all, test.data) and torch.equal(y_all, test.targets)
    assert split_size(offline_digits_root, True) == 9000
    with pytest.raises(ValueError, match=r"0\.\.8999"):
        read_rows(offline_digits_root, True, torch.tensor([9000]))


def test_read_rows_refuses_a_truncated_file(offline_digits_root: Path, tmp_path: Path) -> None:
    shutil.copytree(offline_digits_root / "MNIST", tmp_path / "MNIST")
    path = tmp_path / "MNIST" / "raw" / TRAIN_IMAGES
    path.write_bytes(path.read_bytes()[:-784])
    with pytest.raises(DataError, match=TRAIN_IMAGES):
        read_rows(tmp_path, True, torch.arange(10))


def test_every_byte_value_converts_alike_alone_and_in_bulk() -> None:
    # Vectorised loops and their scalar tails must round alike: every value, odd offsets.
    source = torch.arange(256, dtype=torch.uint8).repeat(28)[: 9 * 784].view(9, 28, 28)
    bulk = to_model_input(source).flatten()
    flat = source.flatten()
    for i in range(0, len(flat), 13):  # 13 is coprime to 256: all 256 values
        assert torch.equal(to_model_input(flat[i : i + 1].view(1, 1, 1)).flatten(), bulk[i : i + 1])
    for start, length in ((1, 5), (7, 17), (31, 300), (100, 6000)):
        part = to_model_input(flat[start : start + length].view(1, 1, -1)).flatten()
        assert torch.equal(part, bulk[start : start + length])
    reference = (torch.arange(256, dtype=torch.float32) / 255 - 0.5) / 0.5
    assert torch.equal(bulk[:256], reference)


def test_shard_batches_are_bit_identical_to_the_float_split(
    offline_digits_root: Path, float_train: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x_f, y_f = float_train
    for rank, shard in enumerate(partition(len(x_f), 3, seed=42), start=1):
        loader = ShardLoader.read(offline_digits_root, shard, 32, seed=42, rank=rank)
        for epoch in (0, 3):
            order = loader.order(epoch)
            for i in (0, 17, loader.steps_per_epoch - 1):
                xb, yb = loader.batch(epoch, i)
                rows = order[i * 32 : (i + 1) * 32]  # what the old loader indexed the split with
                assert xb.dtype == torch.float32 and xb.shape == (32, 1, 28, 28)
                assert torch.equal(xb, x_f[rows]) and torch.equal(yb, y_f[rows])
        # A balanced take across an epoch boundary, and the float loader, agree too.
        xt, yt = loader.take(len(shard) - 5, 40)
        rows = torch.cat([loader.order(0)[-5:], loader.order(1)[:35]])
        assert torch.equal(xt, x_f[rows]) and torch.equal(yt, y_f[rows])
        old = ShardLoader(x_f, y_f, shard, 32, seed=42, rank=rank)
        assert torch.equal(old.batch(2, 5)[0], loader.batch(2, 5)[0])


def test_a_loader_holds_only_its_shard(
    offline_digits_root: Path, float_train: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x_f, y_f = float_train
    shard = partition(len(x_f), 3, seed=42)[2]
    loader = ShardLoader.read(offline_digits_root, shard, 32, seed=42, rank=3)
    assert loader.x.dtype == torch.uint8 and loader.x.shape == (len(shard), 28, 28)
    assert loader.x.untyped_storage().nbytes() == len(shard) * 784
    # Built from the whole split, it keeps a copy of its rows and not the split.
    copied = ShardLoader(x_f, y_f, shard, 32, seed=42, rank=3)
    assert copied.x.untyped_storage().nbytes() == len(shard) * 784 * 4
    assert copied.x.untyped_storage().data_ptr() != x_f.untyped_storage().data_ptr()


def test_streaming_eval_from_uint8_equals_eval_on_floats(offline_digits_root: Path) -> None:
    x_f, y = load_split(offline_digits_root, train=False)
    x_u8, y_u8 = read_rows(offline_digits_root, False)
    model = build_model("SimpleNN", 784, 128, 10, seed=3)
    for batch in (1000, 333):
        assert evaluate(model, x_u8, y_u8, batch) == evaluate(model, x_f, y, batch)
    loss, accuracy = evaluate(model, x_u8, y_u8)
    with torch.no_grad():
        logits = model.eval()(x_f)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item())
