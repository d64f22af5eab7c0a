"""`smolcluster watch`: follow the server's metrics JSONL from the controller.

Reads the file directly for a local host, or over SFTP (paramiko) with the
inventory's SSH settings, ProxyCommand included. Prints one line per step/eval
and exits 0 when the summary event appears, 1 on timeout, 2 on a malformed record
(named by file and line; the records are declared in smolcluster/events.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from smolcluster.events import (
    MetricsFileError,
    Record,
    RecordStream,
    StepRecord,
    SummaryRecord,
)

LOCAL_CONNECTIONS = {"local"}


WINDOW = 20  # recent steps behind the rate, the ETA and "slowest"


@dataclass
class Progress:
    """What the metrics file says so far."""

    total_steps: int | None = None
    mode: str = "sync"
    role: str = "server"
    step: int | None = None
    epoch: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    accuracy_step: int | None = None
    summary: SummaryRecord | None = None
    error: str | None = None  # a malformed record stopped the reading here
    events: int = 0
    # (wall, step, cumulative samples, host that answered last) of recent step events
    recent: list[tuple[float, int, int, str | None]] = field(default_factory=list)
    samples_total: int = 0

    def update(self, event: Record) -> str | None:
        """Fold one event in; return a display line for step/eval/member/summary events."""
        self.events += 1
        if event["event"] == "start":
            self.total_steps = event["total_steps"]
            self.mode, self.role = event["mode"], event["role"]
            return None
        elif event["event"] == "step":
            self.step, self.epoch = event["step"], event.get("epoch", self.epoch)
            if event["loss"] is not None:
                self.loss = event["loss"]
            self._count(event)
        elif event["event"] == "eval":
            self.accuracy = event["val_accuracy"]
            self.accuracy_step = event["step"]
        elif event["event"] == "member":
            # Who left, and who started after the run began; the start's roll call is noise.
            if event["change"] == "joined" or (event["change"] == "started" and not event["step"]):
                return None
            why = f" ({event['reason']})" if "reason" in event else ""
            return (
                f"{event['host']} {event['change']} at step {event['step']}{why}; "
                f"{event['workers']} training"
            )
        else:
            self.summary = event
            self.accuracy = event.get("final_accuracy", self.accuracy)
            self.step = event["steps"]
        return self.line()

    def _count(self, event: StepRecord) -> None:
        samples = event.get("samples") or 0
        # The elastic server counts samples merged so far; every other file, those of this step.
        merged_so_far = self.mode == "elastic" and self.role == "server"
        self.samples_total = samples if merged_so_far else self.samples_total + samples
        order = list(event.get("batch_sizes") or {})  # sync: in order of arrival
        last = order[-1] if len(order) > 1 else None
        mark = (event["wall"], event["step"], self.samples_total, last)
        self.recent = [*self.recent[-WINDOW:], mark]

    @property
    def samples_per_s(self) -> float | None:
        if len(self.recent) < 2 or self.recent[-1][0] <= self.recent[0][0]:
            return None
        (w0, _, n0, _), (w1, _, n1, _) = self.recent[0], self.recent[-1]
        return (n1 - n0) / (w1 - w0)

    @property
    def eta_s(self) -> float | None:
        if len(self.recent) < 2 or not self.total_steps or self.step is None:
            return None
        (w0, s0, _, _), (w1, s1, _, _) = self.recent[0], self.recent[-1]
        if s1 <= s0:
            return None
        return max(0.0, (self.total_steps - self.step) * (w1 - w0) / (s1 - s0))

    @property
    def slowest(self) -> str | None:
        """The worker whose gradients came last most often in recent sync steps."""
        lasts = [host for *_, host in self.recent if host]
        return max(set(lasts), key=lasts.count) if lasts else None

    def line(self) -> str:
        if self.error is not None:
            return f"error: {self.error}"
        if self.summary is not None:
            return (
                f"done: {self.step} steps, accuracy {_fmt(self.accuracy)}, "
                f"{_fmt(self.summary.get('samples_per_s'), '.1f')} samples/s, "
                f"wall {_fmt(self.summary.get('wall'), '.1f')}s"
            )
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [
            f"step {self.step if self.step is not None else '-'}{total}",
            f"epoch {self.epoch + 1 if isinstance(self.epoch, int) else '-'}",
            f"loss {_fmt(self.loss)}",
            f"accuracy {_fmt(self.accuracy)}"
            + (f" (step {self.accuracy_step})" if self.accuracy_step is not None else ""),
            f"{_fmt(self.samples_per_s, '.0f')} samples/s",
        ]
        if self.slowest:
            parts.append(f"slowest {self.slowest}")
        parts.append(f"ETA {_duration(self.eta_s)}")
        return "  ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "samples_per_s": self.samples_per_s,
            "slowest": self.slowest,
            "eta_s": self.eta_s,
            "done": self.summary is not None,
            "error": self.error,
            "line": self.line(),
        }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


class Source(Protocol):
    def read_from(self, offset: int) -> bytes: ...


class LocalSource:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read_from(self, offset: int) -> bytes:
        try:
            with self.path.open("rb") as handle:
                handle.seek(offset)
                return handle.read()
        except FileNotFoundError:
            return b""


class SFTPSource:
    """Reads the remote file over one SSH connection, opened lazily and kept."""

    def __init__(self, settings: SSHSettings, path: str) -> None:
        self.settings, self.path = settings, path
        self._sftp: Any = None

    def read_from(self, offset: int) -> bytes:
        if self._sftp is None:
            self._sftp = self.settings.connect().open_sftp()
        try:
            with self._sftp.open(self.path, "rb") as handle:
                handle.seek(offset)
                return handle.read()
        except FileNotFoundError:
            return b""


@dataclass
class SSHSettings:
    host: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    proxy_command: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def connect(self) -> Any:
        import paramiko  # controller-only dependency

        client = paramiko.SSHClient()
        client.load_system_host_keys()
        # Same stance as Ansible's host_key_checking: unknown hosts are refused.
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        sock = paramiko.ProxyCommand(self.proxy_command) if self.proxy_command else None
        client.connect(
            self.host,
            port=self.port,
            username=self.user,
            key_filename=self.key_file,
            sock=sock,
            timeout=15,
        )
        return client


def proxy_command(ssh_args: str, host: str, port: int, user: str | None) -> str | None:
    """The ProxyCommand (or ProxyJump, as `ssh -W`) in Ansible-style ssh args, expanded."""
    tokens = shlex.split(ssh_args)
    options: list[str] = []
    jump: str | None = None
    for index, token in enumerate(tokens):
        nxt = tokens[index + 1] if index + 1 < len(tokens) else ""
        if token == "-o":
            options.append(nxt)
        elif token.startswith("-o"):
            options.append(token[2:])
        elif token == "-J":
            jump = nxt
    command: str | None = None
    for option in options:
        key, _, value = option.replace("=", " ", 1).partition(" ")
        if key.lower() == "proxycommand":
            command = value.strip()
        elif key.lower() == "proxyjump":
            jump = value.strip()
    if command is None and jump:
        command = f"ssh -W %h:%p {jump}"
    if command is None:
        return None
    expanded = command.replace("%%", "\0").replace("%h", host).replace("%p", str(port))
    return expanded.replace("%r", user or "").replace("\0", "%")


def ssh_settings(hostvars: dict[str, Any], name: str) -> SSHSettings:
    """SSH settings for `name` from its (untemplated) inventory variables."""
    host = str(hostvars.get("ansible_host") or name)
    port = int(hostvars.get("ansible_port") or 22)
    user = hostvars.get("ansible_user")
    args = " ".join(
        str(hostvars.get(key) or "")
        for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args")
    )
    return SSHSettings(
        host=host,
        port=port,
        user=user,
        key_file=hostvars.get("ansible_ssh_private_key_file"),
        proxy_command=proxy_command(args, host, port, user),
        extra=hostvars,
    )


def inventory_host(inventory: str, host: str | None) -> tuple[str, dict[str, Any]]:
    """(host name, its variables) via ansible-inventory; the default host is the server."""
    exe = str(Path(sys.executable).with_name("ansible-inventory"))
    if host is None:
        listing = json.loads(subprocess.check_output([exe, "-i", inventory, "--list"], text=True))
        servers = listing.get("server", {}).get("hosts", [])
        if len(servers) != 1:
            raise SystemExit(f"smolcluster: error: {inventory}: server: need exactly one host")
        host = servers[0]
    out = subprocess.check_output([exe, "-i", inventory, "--host", host], text=True)
    return host, json.loads(out)


def follow(source: Source, name: str, out: TextIO, timeout_s: float, interval_s: float) -> int:
    """Print progress lines until the summary event (0), the timeout (1) or a bad record (2)."""
    progress, offset, stream = Progress(), 0, RecordStream(name)
    deadline = time.monotonic() + timeout_s
    while True:
        chunk = source.read_from(offset)
        offset += len(chunk)
        try:
            for record in stream.feed(chunk):  # complete lines only: the writer may be mid-line
                line = progress.update(record)
                if line:
                    print(line, file=out, flush=True)
                if progress.summary is not None:
                    return 0
        except MetricsFileError as exc:
            print(f"smolcluster: error: {exc}", file=sys.stderr)
            return 2
        if time.monotonic() >= deadline:
            print(f"smolcluster: error: no summary within {timeout_s:.0f}s", file=sys.stderr)
            return 1
        time.sleep(interval_s)


def status(path: Path) -> dict[str, Any]:
    """One-shot summary of a local metrics file (used by the job status probe); a malformed
    record ends the reading and its file:line becomes the progress line."""
    progress = Progress()
    try:
        for record in RecordStream(str(path)).feed(LocalSource(path).read_from(0)):
            progress.update(record)
    except MetricsFileError as exc:
        progress.error = str(exc)
    return progress.as_dict()


def add_watch_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "watch", help="follow the server's metrics (locally or over SSH)"
    )
    _add_arguments(parser)
    parser.set_defaults(run=run_watch)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", help="metrics JSONL path (remote: relative to the home dir)")
    parser.add_argument(
        "--inventory", "-i", help="Ansible inventory; default: read --metrics locally"
    )
    parser.add_argument("--host", help="inventory host to follow (default: the server)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after S seconds")
    parser.add_argument("--interval", type=float, default=1.0, help="poll every S seconds")
    parser.add_argument(
        "--status", action="store_true", help="print the latest state as JSON, exit"
    )


def run_watch(args: argparse.Namespace) -> int:
    if args.status:
        if not args.metrics:
            print("smolcluster: error: --status needs --metrics", file=sys.stderr)
            return 2
        print(json.dumps(status(Path(args.metrics))))
        return 0
    source: Source
    if args.inventory:
        name, hostvars = inventory_host(args.inventory, args.host)
        metrics = args.metrics or _default_metrics(name, hostvars)
        if hostvars.get("ansible_connection") in LOCAL_CONNECTIONS:
            source, where = LocalSource(Path(metrics)), metrics
        else:
            source, where = SFTPSource(ssh_settings(hostvars, name), metrics), f"{name}:{metrics}"
    elif args.metrics:
        source, where = LocalSource(Path(args.metrics)), args.metrics
    else:
        print("smolcluster: error: give --metrics or --inventory", file=sys.stderr)
        return 2
    return follow(source, where, sys.stdout, args.timeout, args.interval)


def _default_metrics(name: str, hostvars: dict[str, Any]) -> str:
    if hostvars.get("ansible_connection") in LOCAL_CONNECTIONS:
        return f".local-cluster/{name}/run/{name}.jsonl"
    return f"smolcluster/run/{name}.jsonl"  # SFTP paths start in the home directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smolcluster watch", description=__doc__)
    _add_arguments(parser)
    return run_watch(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
