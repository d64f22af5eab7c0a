"""Where a process reports what it did: a JSONL file, W&B, and a log line now and then.

The JSONL file (<metrics_dir>/<host>.jsonl) is the source of truth the Ansible watcher and the
report read; W&B mirrors it under the original tool's project name and run names.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("smolcluster")

WANDB_PROJECT = "smolcluster"


def wandb_mode(configured: str) -> str:
    """auto -> online only when an API key is present; never an interactive login prompt."""
    if configured != "auto":
        return configured
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Metrics:
    def __init__(
        self,
        metrics_dir: Path,
        host: str,
        role: str,
        run_name: str,
        mode: str,
        config: dict[str, Any],
    ) -> None:
        metrics_dir.mkdir(parents=True, exist_ok=True)
        self.path = metrics_dir / f"{host}.jsonl"
        self._file = self.path.open("a", buffering=1)
        self.role, self.host = role, host
        self.started = time.monotonic()
        self._wandb = None
        mode = wandb_mode(mode)
        if mode != "disabled":
            self._wandb = _start_wandb(metrics_dir, run_name, mode, config)

    @property
    def wall(self) -> float:
        return round(time.monotonic() - self.started, 4)

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), "wall": self.wall, **fields}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None and event in ("step", "eval", "summary"):
            flat = {k: v for k, v in fields.items() if isinstance(v, int | float)}
            for name, norm in (fields.get("grad_norms") or {}).items():
                flat[f"grad_norm/{name}"] = norm
            if event == "summary":
                self._wandb.summary.update(flat)
            else:
                self._wandb.log(flat, step=fields.get("step"))

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(metrics_dir: Path, run_name: str, mode: str, config: dict[str, Any]) -> Any:
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        return wandb.init(
            project=WANDB_PROJECT,
            name=run_name,
            mode=mode,
            config=config,
            dir=str(metrics_dir),
            reinit="finish_previous",
        )
    except Exception as exc:  # W&B is a mirror; training must not die because it is down.
        log.warning("W&B disabled for this run: %s", exc)
        return None


def run_name(
    role: str, host: str, lr: float, batch_size: int, workers: int, rank: int | None = None
) -> str:
    """The original tool's names: server-<host>_lr.._bs.._workers.., worker-<host>_rank.._..."""
    if role == "worker":
        return f"worker-{host}_rank{rank}_lr{lr}_bs{batch_size}"
    return f"{role}-{host}_lr{lr}_bs{batch_size}_workers{workers}"


def setup_logging(host: str, role: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {role}@{host} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
