"""Durable server state: written atomically, read back without unpickling arbitrary objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save(path: Path, state: dict[str, Any]) -> None:
    """Write to a temp file, fsync, rename over the old one, fsync the directory.

    A crash at any moment leaves either the previous checkpoint or the new one, never half.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    # weights_only: tensors, numbers, strings, lists and dicts only; nothing executes.
    return torch.load(path, weights_only=True)
