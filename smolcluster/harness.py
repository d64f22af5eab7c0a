"""Real smolcluster runs on one machine, for the tests and the benchmarks alike.

`LocalCluster` writes a cluster and an nn config, a secret, starts `python -m smolcluster
server|worker|local` processes, waits on them and on their JSONL metrics; `GlooRanks` starts
`python -m smolcluster.gloo_backend` ranks. Both only drive the public command lines, so what
they run is what Ansible runs. Every address is 127.0.0.1 unless the caller moves a run into
network namespaces of its own (`launch`, benchmarks/links.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from smolcluster.events import of_kind, read_records
from smolcluster.protocol import write_secret

LOOPBACK = "127.0.0.1"
SERVER = "mini1"
HOSTS = ["mini2", "mini3", "pi5", "pi4", "macbook"]  # worker names, in rank order


class RunFailed(AssertionError):
    """A process of the run failed or hung (an AssertionError, so a test shows it as one)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p and p + 1 free: gloo's rendezvous listens on the cluster port + 1."""
    for _ in range(200):
        port = free_port()
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((LOOPBACK, port))
                b.bind((LOOPBACK, port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of loopback ports")


def worker_names(n: int) -> list[str]:
    return (HOSTS + [f"worker{i}" for i in range(len(HOSTS) + 1, n + 1)])[:n]


def read_events(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The records of one JSONL metrics file, optionally of one event kind: the one place the
    tests and the benchmarks read metrics."""
    records = list(read_records(path))  # checked against the schema; names file:line if bad
    return records if event is None else of_kind(records, event)


def count_events(path: Path, event: str) -> int:
    """How many `event` records a metrics file holds so far: a byte count, not a parse, so it
    is cheap enough to poll; read_events checks the records."""
    try:
        return path.read_bytes().count(f'"event": "{event}"'.encode())
    except OSError:
        return 0


class Processes:
    """The child processes of one run, each logging to <directory>/<name>.log and each in a
    session of its own, so stopping the run kills exactly its processes (and their children,
    e.g. under `ip netns exec`)."""

    def __init__(
        self,
        directory: Path,
        threads: int = 1,
        launch: Callable[[str], list[str]] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = directory
        self.launch = launch  # argv prefix per process name
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            **(env or {}),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_dir(self) -> Path:
        return self.dir / "metrics"

    def start_process(
        self, name: str, argv: Sequence[str], preexec_fn: Callable[[], None] | None = None
    ) -> subprocess.Popen:
        prefix = self.launch(name) if self.launch else []
        with (self.dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [*prefix, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.dir,
                start_new_session=True,
                preexec_fn=preexec_fn,
            )
        self.procs[name] = proc
        return proc

    def wait(
        self, timeout: float = 600, poll: Callable[[], object] | None = None, check: bool = False
    ) -> dict[str, int]:
        """Exit codes by name once every process has ended; `poll` runs every 10 ms meanwhile.
        On timeout everything is killed; with check, a non-zero exit raises too. Anything else
        that ends the wait (Ctrl-C, an error in `poll`) kills them as well: each runs in a
        session of its own, so no terminal signal would reach them."""
        deadline = time.monotonic() + timeout
        try:
            while any(proc.poll() is None for proc in self.procs.values()):
                if time.monotonic() > deadline:
                    running = [name for name, proc in self.procs.items() if proc.poll() is None]
                    raise RunFailed(
                        f"{running} still running after {timeout:.0f} s:\n{self.logs()}"
                    )
                if poll is not None:
                    poll()
                time.sleep(0.01 if poll else 0.1)
        except BaseException:
            self.stop()
            raise
        codes = {name: proc.returncode for name, proc in self.procs.items()}
        failed = [name for name, code in codes.items() if code != 0]
        if check and failed:
            raise RunFailed(f"failed {codes}; logs in {self.dir}:\n{self.logs(failed)}")
        return codes

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the session start_process made
                proc.wait()

    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs.values()]

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, names: Sequence[str] | None = None) -> str:
        return "\n".join(f"--- {name}\n{self.log(name)[-3000:]}" for name in names or self.procs)

    def events(self, host: str, event: str | None = None) -> list[dict[str, Any]]:
        return read_events(self.metrics_dir / f"{host}.jsonl", event)

    def summary(self, host: str = SERVER) -> dict[str, Any]:
        summaries = self.events(host, "summary")
        assert summaries, f"no summary from {host}:\n{self.logs()}"
        return summaries[-1]

    def wait_for(
        self, host: str, reached: Callable[[dict], bool], what: str, timeout: float = 600
    ) -> None:
        """Until one of `host`'s step records satisfies `reached`; fail if `host` ends first."""
        deadline = time.monotonic() + timeout
        path = self.metrics_dir / f"{host}.jsonl"
        while time.monotonic() < deadline:
            if path.exists() and any(reached(e) for e in self.events(host, "step")):
                return
            if self.procs[host].poll() is not None:
                raise RunFailed(f"{host} exited early:\n{self.logs()}")
            time.sleep(0.2)
        raise RunFailed(f"{host} never reached {what}:\n{self.logs()}")

    def wait_for_step(self, step: int, host: str = SERVER) -> None:
        self.wait_for(host, lambda e: e.get("step", 0) >= step, f"step {step}")


class LocalCluster(Processes):
    """A server and workers as separate processes, configured by two YAML files as Ansible
    configures them; `cluster` and `nn` override keys of the defaults below."""

    def __init__(
        self,
        directory: Path,
        data_root: Path,
        workers: int = 3,
        cluster: dict[str, Any] | None = None,
        nn: dict[str, Any] | None = None,
        launch: Callable[[str], list[str]] | None = None,
        env: dict[str, str] | None = None,
        module: str = "smolcluster",
    ) -> None:
        self.server = SERVER
        # what `python -m` runs; benchmarks/plaintext.py: the same CLI with encryption off
        self.module = module
        self.workers = worker_names(workers)
        self.cluster_config = {
            "host_ip": dict.fromkeys([SERVER, *HOSTS, *self.workers], LOOPBACK),
            "port": free_port_pair(),
            "num_workers": workers,
            "workers": self.workers,
            "server": SERVER,
            "seed": 42,
            "bind_address": LOOPBACK,
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
        super().__init__(directory, self.cluster_config["torch_threads"], launch, env)
        self.cluster_file = directory / "cluster_config.yaml"
        self.nn_file = directory / "nn_config.yaml"
        self.cluster_file.write_text(yaml.safe_dump(self.cluster_config))
        self.nn_file.write_text(yaml.safe_dump(self.nn_config))
        if not (directory / "secret").exists():
            write_secret(directory / "secret")

    @property
    def port(self) -> int:
        return self.cluster_config["port"]

    @property
    def secret(self) -> bytes:
        return (self.dir / "secret").read_bytes().strip()

    def command(self, role: str, *extra: str) -> list[str]:
        configs = ["--cluster-config", str(self.cluster_file), "--nn-config", str(self.nn_file)]
        return [sys.executable, "-m", self.module, role, *configs, *extra]

    def spawn(
        self, name: str, role: str, *extra: str, preexec_fn: Callable[[], None] | None = None
    ) -> subprocess.Popen:
        return self.start_process(name, self.command(role, *extra), preexec_fn)

    def start(self, *extra: str) -> None:
        self.spawn(SERVER, "server", *extra)
        for host in self.workers:
            self.spawn(host, "worker", "--host", host, *extra)

    def wait_for_server_port(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                return
            except OSError:
                if self.procs[SERVER].poll() is not None:
                    raise RunFailed("server exited:\n" + self.log(SERVER)) from None
                time.sleep(0.2)
        raise RunFailed("server never listened:\n" + self.log(SERVER))


class GlooRanks(Processes):
    """`world` torch.distributed DDP ranks (`python -m smolcluster.gloo_backend`), named
    rank0..; rank 0 evaluates and writes the summary."""

    def __init__(
        self,
        directory: Path,
        world: int,
        threads: int = 1,
        launch: Callable[[str], list[str]] | None = None,
    ) -> None:
        super().__init__(directory, threads, launch)
        self.hosts = [f"rank{r}" for r in range(world)]

    def start(self, data_root: Path, *flags: str, master_addr: str = LOOPBACK) -> None:
        """Every rank, with `flags` (--max-steps, --batch-size, ...) added to each."""
        port = free_port_pair()
        for rank, host in enumerate(self.hosts):
            self.start_process(
                host,
                [
                    sys.executable, "-m", "smolcluster.gloo_backend",
                    "--master-addr", master_addr, "--port", str(port),
                    "--world-size", str(len(self.hosts)), "--rank", str(rank),
                    "--hosts", *self.hosts,
                    "--data-root", str(data_root), "--metrics-dir", str(self.metrics_dir),
                    *flags,
                ],
            )  # fmt: skip
