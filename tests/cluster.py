"""Run real smolcluster processes on 127.0.0.1 for the tests: configs, secret, spawn, wait."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from smolcluster.events import of_kind, read_records
from smolcluster.protocol import write_secret

HOSTS = ["mini2", "mini3", "pi5", "pi4", "macbook"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    """A server and workers as separate processes on loopback, each with its own log file."""

    def __init__(
        self,
        directory: Path,
        data_root: Path,
        workers: int = 3,
        cluster: dict[str, Any] | None = None,
        nn: dict[str, Any] | None = None,
    ) -> None:
        self.dir = directory
        self.workers = HOSTS[:workers]
        self.cluster_config = {
            "host_ip": {host: "127.0.0.1" for host in ["mini1", *HOSTS]},
            "port": free_port(),
            "num_workers": workers,
            "workers": self.workers,
            "server": "mini1",
            "seed": 42,
            "bind_address": "127.0.0.1",
            "secret_file": "secret",
            "metrics_dir": "metrics",
            "wandb_mode": "disabled",
            "torch_threads": 1,
            "join_timeout_s": 120.0,
            **(cluster or {}),
        }
        self.nn_config = {
            "batch_size": 32,
            "learning_rate": 0.001,
            "num_epochs": 1,
            "eval_steps": 25,
            "track_gradients": False,
            "dataset": {"name": "MNIST", "root": str(data_root)},
            **(nn or {}),
        }
        directory.mkdir(parents=True, exist_ok=True)
        self.cluster_file = directory / "cluster_config.yaml"
        self.nn_file = directory / "nn_config.yaml"
        self.cluster_file.write_text(yaml.safe_dump(self.cluster_config))
        self.nn_file.write_text(yaml.safe_dump(self.nn_config))
        if not (directory / "secret").exists():
            write_secret(directory / "secret")
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def port(self) -> int:
        return self.cluster_config["port"]

    @property
    def secret(self) -> bytes:
        return (self.dir / "secret").read_bytes().strip()

    @property
    def metrics_dir(self) -> Path:
        return self.dir / "metrics"

    def command(self, role: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "smolcluster",
            role,
            "--cluster-config",
            str(self.cluster_file),
            "--nn-config",
            str(self.nn_file),
            *extra,
        ]

    def spawn(
        self, name: str, role: str, *extra: str, preexec_fn: Callable[[], None] | None = None
    ) -> subprocess.Popen:
        log = (self.dir / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            self.command(role, *extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.dir,
            preexec_fn=preexec_fn,
        )
        self.procs[name] = proc
        return proc

    def start(self, *extra: str) -> None:
        self.spawn("mini1", "server", *extra)
        for host in self.workers:
            self.spawn(host, "worker", "--host", host, *extra)

    def wait(self, timeout: float = 600) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stop()
                raise AssertionError(
                    f"{name} still running after {timeout} s; logs:\n" + self.logs()
                ) from None
        return codes

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.log(name)[-3000:]}" for name in self.procs)

    def events(self, host: str, event: str | None = None) -> list[Any]:
        """The host's records (of one kind), checked against smolcluster/events.py."""
        records = list(read_records(self.metrics_dir / f"{host}.jsonl"))
        return records if event is None else of_kind(records, event)

    def summary(self, host: str = "mini1") -> dict[str, Any]:
        summaries = self.events(host, "summary")
        assert summaries, f"no summary from {host}:\n{self.logs()}"
        return summaries[-1]

    def wait_for_server_port(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.procs["mini1"].poll() is not None:
                    raise AssertionError("server exited:\n" + self.log("mini1")) from None
                time.sleep(0.2)
        raise AssertionError("server never listened:\n" + self.log("mini1"))
