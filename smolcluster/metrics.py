"""Where a process reports what it did: a JSONL file, W&B, and a log line now and then.

The JSONL file (<metrics_dir>/<host>.jsonl) is the source of truth the Ansible watcher and the
report read; its records are declared in smolcluster/events.py. W&B mirrors it under the
original tool's project name and run names.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from smolcluster import events

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
        _drop_torn_line(self.path)
        self._file = self.path.open("a", buffering=1)
        self._reported: set[str] = set()
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
        """Append one record; its kind and fields must match smolcluster/events.py."""
        record = {"event": event, "time": round(time.time(), 3), "wall": self.wall}
        if event == "start":
            record["schema"] = events.SCHEMA_VERSION
        record.update(fields)
        try:
            events.validate(record)
        except events.RecordError as exc:
            # A programming error: tests (SMOLCLUSTER_STRICT_METRICS=1) fail on it; a training
            # run must not die of it, so it logs the first bad record of each kind (not one
            # line per step) and keeps every record, so nothing is lost.
            if events.strict():
                raise
            if event not in self._reported:
                self._reported.add(event)
                log.error("metrics record does not match the schema (first of its kind): %s", exc)
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


def _drop_torn_line(path: Path) -> None:
    """Cut a last line that lacks its newline (a job killed mid-write) before appending to the
    file again (a resumed run), so the next record does not land on the same line."""
    try:
        with path.open("rb+") as handle:
            if handle.seek(0, os.SEEK_END) == 0:
                return
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) == b"\n":
                return
            handle.seek(0)
            data = handle.read()
            keep = data.rfind(b"\n") + 1
            handle.truncate(keep)
            log.warning("%s: dropped a torn last line (%d bytes)", path, len(data) - keep)
    except FileNotFoundError:
        pass


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
