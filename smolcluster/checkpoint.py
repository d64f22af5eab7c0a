"""Durable server state: written atomically, read back without unpickling arbitrary objects."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smolcluster.hub import Hub, Terminated
from smolcluster.replica import Replica

log = logging.getLogger("smolcluster")


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


@dataclass
class Progress:
    """What the run has done; a checkpoint carries step and samples_merged across a restart."""

    step: int = 0  # sync: optimizer steps taken; elastic: global version
    samples_merged: int = 0
    checksum_mismatches: int = 0


class Checkpointer:
    """The server's durable state: replica, progress, balancer cursors, the members then."""

    def __init__(
        self,
        path: Path,
        mode: str,
        every: int,
        replica: Replica,
        progress: Progress,
        hub: Hub,
        cursors: dict[str, int] | None = None,
    ) -> None:
        self.path, self.mode, self.every = path, mode, every
        self.replica, self.progress, self.hub = replica, progress, hub
        self.cursors = cursors  # balance: auto's sample cursors, restored in place

    def save(self) -> None:
        params, exp_avg, exp_avg_sq = self.replica.state_tensors()
        save(
            self.path,
            {
                "format": 1,
                "mode": self.mode,
                "step": self.progress.step,
                "samples_merged": self.progress.samples_merged,
                "params": params,
                "exp_avg": exp_avg,
                "exp_avg_sq": exp_avg_sq,
                "optimizer_step": self.replica.optimizer_step,
                "torch_rng": torch.get_rng_state(),
                "members": sorted({p.host for p in self.hub.active}),
                "cursors": dict(self.cursors) if self.cursors is not None else {},
            },
        )

    def resume(self) -> None:
        state = load(self.path)
        if state is None:
            log.warning("--resume: no checkpoint at %s; starting from step 0", self.path)
            return
        if state["mode"] != self.mode:
            raise RuntimeError(
                f"checkpoint {self.path} is from a {state['mode']} run, this run is {self.mode}"
            )
        self.replica.load_state_buffer(
            torch.cat([state["params"], state["exp_avg"], state["exp_avg_sq"]]),
            state["optimizer_step"],
        )
        torch.set_rng_state(state["torch_rng"])
        self.progress.step, self.progress.samples_merged = state["step"], state["samples_merged"]
        if self.cursors is not None:
            self.cursors.update(state.get("cursors", {}))
        log.info(
            "resumed from %s at step %d (members then: %s)",
            self.path,
            self.progress.step,
            ", ".join(state["members"]) or "none",
        )

    def boundary(self) -> None:
        """Between steps: checkpoint on schedule; honour SIGTERM."""
        if self.hub.terminate.is_set():
            raise Terminated
        if self.progress.step % self.every == 0:
            self.save()
