"""`smolcluster report <run-dir>`: summary table and report.png for a fetched run.

The logs role fetches each host's files into <run-dir>/<host>/; this reads every <host>.jsonl
found there, prints one summary line per host and draws <run-dir>/report.png: the server's
training loss and test accuracy over steps with membership changes (joins, drops, rejoins)
marked, each worker's samples/s, where its time went (compute / sending / waiting for the
average), and the bytes each host moved. The title says which dataset the run used. A malformed
record (smolcluster/events.py declares them) is an error naming its file and line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolcluster.events import MemberRecord, MetricsFileError, StepRecord, read_records


@dataclass
class HostRun:
    host: str
    role: str = "?"
    start: dict[str, Any] = field(default_factory=dict)
    loss: list[tuple[int, float]] = field(default_factory=list)
    accuracy: list[tuple[int, float]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    # Worker sync steps: seconds computing, sending (step minus compute minus wait), waiting.
    compute_s: float = 0.0
    send_s: float = 0.0
    wait_s: float = 0.0
    # Server: who answered each step (sync) or how many were active (elastic).
    members: list[tuple[int, frozenset[str] | int]] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)  # server: from its member records
    metrics: bool = True  # False: the host's directory holds no <host>.jsonl (died early)
    samples: int = 0  # summed over step events, for a job that ended without a summary
    last_step: dict[str, Any] = field(default_factory=dict)
    exit_code: str | None = None


@dataclass(frozen=True)
class Change:
    step: int
    kind: str  # "join", "drop" or "rejoin"
    who: str
    why: str = ""  # a drop's reason, from the server's member record


def load_run(run_dir: Path) -> list[HostRun]:
    """Every host's metrics under run_dir (one level of host directories, or flat)."""
    runs = []
    for path in sorted(run_dir.glob("*/*.jsonl")) or sorted(run_dir.glob("*.jsonl")):
        runs.append(_load_host(path))
    if runs:  # hosts whose logs were fetched but that never wrote a metric
        seen = {r.host for r in runs}
        for host_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            if host_dir.name not in seen and (host_dir / f"{host_dir.name}.log").exists():
                runs.append(HostRun(host=host_dir.name, role="worker", metrics=False))
    for run in runs:
        exit_file = run_dir / run.host / f"{run.host}.exit"
        if exit_file.is_file():
            run.exit_code = exit_file.read_text().strip()
    return runs


def _load_host(path: Path) -> HostRun:
    run = HostRun(host=path.stem)
    for event in read_records(path):
        if event["event"] == "start":
            run.role = event["role"]
            run.start = dict(event)
        elif event["event"] == "step":
            _step(run, event)
        elif event["event"] == "eval":
            run.accuracy.append((event["step"], event["val_accuracy"]))
        elif event["event"] == "member":
            _member(run, event)
        else:
            run.summary = dict(event)
    return run


def _step(run: HostRun, event: StepRecord) -> None:
    step = event["step"]
    if event["loss"] is not None:
        run.loss.append((step, event["loss"]))
    if run.role == "server":
        if isinstance(event.get("batch_sizes"), dict):
            run.members.append((step, frozenset(event["batch_sizes"])))
        elif isinstance(event.get("workers"), int):
            run.members.append((step, event["workers"]))
        return
    run.last_step = dict(event)
    run.samples += event.get("samples") or 0
    compute, wait, total = event.get("compute_s"), event.get("wait_s"), event.get("step_time_s")
    if isinstance(compute, int | float):
        run.compute_s += compute
        if isinstance(wait, int | float) and isinstance(total, int | float):
            run.wait_s += wait
            run.send_s += max(0.0, total - wait - compute)


def _member(run: HostRun, event: MemberRecord) -> None:
    host, step = event["host"], event["step"]
    if event["change"] == "left":
        run.changes.append(Change(step, "drop", host, event.get("reason", "")))
    elif event["change"] == "started":
        again = any(c.who == host for c in run.changes)
        # Everyone starting at step 0 (or at the resumed step) is the run's start, not a join.
        if again or step > (run.start.get("resumed_at") or 0):
            run.changes.append(Change(step, "rejoin" if again else "join", host))


def membership_changes(server: HostRun) -> list[Change]:
    """Joins, drops and rejoins: the server's member records, or where it wrote none (older
    runs) what its per-step membership implies."""
    if server.changes:
        return server.changes
    changes: list[Change] = []
    seen: set[str] = set()
    previous: frozenset[str] | int | None = None
    for step, members in server.members:
        if previous is None:
            previous = members
            if isinstance(members, frozenset):
                seen |= members
            continue
        if isinstance(members, frozenset) and isinstance(previous, frozenset):
            for host in sorted(previous - members):
                changes.append(Change(step, "drop", host))
            for host in sorted(members - previous):
                changes.append(Change(step, "rejoin" if host in seen else "join", host))
            seen |= members
        elif isinstance(members, int) and isinstance(previous, int) and members != previous:
            kind = "drop" if members < previous else "join"
            changes.append(Change(step, kind, f"{previous}→{members} workers"))
        previous = members
    return changes


def summary_lines(runs: list[HostRun]) -> list[str]:
    lines = []
    for run in runs:
        s = run.summary or {}
        accuracy = s.get("final_accuracy")
        lines.append(
            f"{run.host:<10} {run.role:<7} "
            f"steps {s.get('steps', '-')!s:>6}  "
            f"accuracy {'-' if accuracy is None else f'{accuracy:.4f}'}  "
            f"samples/s {_num(s.get('samples_per_s'))}  "
            f"bytes sent {s.get('bytes_sent', '-')}"
            + (
                "  (no metrics: its job died before training)"
                if not run.metrics
                else ("" if run.summary else "  (no summary: job did not finish)")
            )
        )
    server = _server(runs)
    if server is not None:
        for change in membership_changes(server):
            why = f" ({change.why})" if change.why else ""
            lines.append(f"membership: step {change.step} {change.kind} {change.who}{why}")
    return lines


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _server(runs: list[HostRun]) -> HostRun | None:
    return next((r for r in runs if r.role == "server"), None)


def _title(runs: list[HostRun], run_dir: Path) -> str:
    server = _server(runs)
    start = server.start if server else {}
    summary = (server.summary if server else None) or {}
    dataset = start.get("dataset") or summary.get("dataset") or "dataset unknown"
    accuracy = summary.get("final_accuracy")
    trained = len([r for r in runs if r.role == "worker" and r.metrics])
    configured = start.get("workers", "?")
    count = f"{configured} workers" + ("" if trained == configured else f" ({trained} trained)")
    head = (
        f"run {run_dir.name}: {start.get('mode', '?')} mode, {count}"
        + (", int8 on the wire" if start.get("quantization") else "")
        + (f", {summary.get('steps')} steps" if summary.get("steps") is not None else "")
        + (f", final test accuracy {accuracy:.4f}" if accuracy is not None else "")
        + ("" if summary else " (the server did not finish)")
    )
    return f"{head}\ndata: {dataset}"


def render_png(runs: list[HostRun], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on the controller
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    (loss_ax, acc_ax, rate_ax), (time_ax, bytes_ax, note_ax) = axes
    server = _server(runs)
    workers = sorted((r for r in runs if r.role != "server" and r.metrics), key=lambda r: r.host)
    changes = membership_changes(server) if server else []

    if server and server.loss:
        loss_ax.plot(*zip(*server.loss, strict=True), lw=1, color="tab:blue", label="server")
    elastic = bool(server and server.start.get("mode") == "elastic")
    xlabel = "server step (one merged worker update)" if elastic else "step"
    loss_ax.set(title="training loss (server, per step)", xlabel=xlabel, ylabel="loss")
    if server and server.accuracy:
        steps, values = zip(*server.accuracy, strict=True)
        acc_ax.plot(steps, values, marker="o", ms=4, color="tab:green")
        acc_ax.text(
            0.98, 0.04, f"last {values[-1]:.4f} at step {steps[-1]}", ha="right",
            transform=acc_ax.transAxes, fontsize=9,
        )  # fmt: skip
        acc_ax.set_ylim(min(values) - 0.02, min(1.0, max(values) + 0.02))
    else:
        acc_ax.text(0.5, 0.5, "no evaluation recorded", ha="center", transform=acc_ax.transAxes)
    acc_ax.set(title="test accuracy (whole test set)", xlabel=xlabel, ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        _mark_changes(ax, changes)
        ax.grid(alpha=0.3)

    names = [w.host if w.summary else f"{w.host} (ended early)" for w in workers]
    known = [_rate(w) for w in workers]
    rates = [rate or 0.0 for rate in known]
    rate_ax.barh(names, rates, color="tab:purple")
    for y, rate in enumerate(known):
        label = " unknown (no summary)" if rate is None else f" {rate:.0f}"
        rate_ax.text(rate or 0.0, y, label, va="center", fontsize=9)
    rate_ax.set(title="samples/s per worker (its whole job)", xlabel="samples/s")
    rate_ax.set_xlim(0, max(rates, default=0) * 1.18 or 1)
    rate_ax.invert_yaxis()

    split = [(w.compute_s, w.send_s, w.wait_s) for w in workers]
    if any(sum(row) > 0 for row in split):
        left = [0.0] * len(workers)
        for i, (label, color) in enumerate(
            [("compute", "tab:blue"), ("encode + send", "tab:orange"),
             ("waiting for the server (sync: slowest worker, evals; elastic: the merge reply)",
              "tab:gray")]
        ):  # fmt: skip
            widths = [row[i] for row in split]
            time_ax.barh(names, widths, left=left, color=color, label=label)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        time_ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        time_ax.invert_yaxis()
    else:
        time_ax.text(0.5, 0.5, "no per-step timers in these metrics",
                     ha="center", va="center", transform=time_ax.transAxes)  # fmt: skip
        time_ax.set_xticks([])
        time_ax.set_yticks([])
    time_ax.set(title="where each worker's time went", xlabel="seconds")

    hosts = [r.host for r in sorted(runs, key=lambda r: (r.role != "server", r.host)) if r.metrics]
    by_host = {r.host: r.summary or r.last_step for r in runs}
    sent = [by_host[h].get("bytes_sent", 0) / 1e6 for h in hosts]
    recv = [by_host[h].get("bytes_recv", 0) / 1e6 for h in hosts]
    ys = range(len(hosts))
    bytes_ax.barh([y - 0.2 for y in ys], sent, height=0.4, label="sent", color="tab:red")
    bytes_ax.barh([y + 0.2 for y in ys], recv, height=0.4, label="received", color="tab:cyan")
    roles = {r.host: r.role for r in runs}
    bytes_ax.set_yticks(
        list(ys), [f"{h} ({roles[h]})" if roles[h] == "server" else h for h in hosts]
    )
    bytes_ax.invert_yaxis()
    bytes_ax.set(title="bytes on the wire per host", xlabel="MB")
    bytes_ax.legend(fontsize="small", loc="lower right")

    note_ax.axis("off")
    notes = [f"step {c.step}: {c.kind} {c.who}" for c in changes] or ["no joins or drops"]
    for run in runs:
        ended = f" (exit {run.exit_code})" if run.exit_code not in (None, "0") else ""
        if not run.metrics:
            notes.append(f"{run.host}: no metrics: its job died before training{ended}")
        elif run.summary is None:
            notes.append(f"{run.host}: no summary: its job ended early{ended}")
    note_ax.set_title("joins, drops, early exits", loc="left")
    note_ax.text(0, 1, "\n".join(notes[:18]), va="top", family="monospace", fontsize=9,
                 transform=note_ax.transAxes)  # fmt: skip

    fig.suptitle(_title(runs, out.parent), fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _rate(run: HostRun) -> float | None:
    """samples/s of the whole job: its summary, else its steps up to the last one it logged."""
    if run.summary and run.summary.get("samples_per_s") is not None:
        return float(run.summary["samples_per_s"])
    wall = run.last_step.get("wall")
    if run.samples and isinstance(wall, int | float) and wall > 0:
        return run.samples / wall
    return None


COLORS = {"drop": "tab:red", "join": "tab:green", "rejoin": "tab:olive"}


def _mark_changes(ax: Any, changes: list[Change]) -> None:
    for change in changes:
        ax.axvline(change.step, color=COLORS[change.kind], ls="--", lw=1, alpha=0.8)
        ax.annotate(
            f"{change.kind} {change.who}", (change.step, 1), xycoords=("data", "axes fraction"),
            rotation=90, va="top", ha="right", fontsize=8, color=COLORS[change.kind],
        )  # fmt: skip


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("report", help="summarise a fetched run and draw report.png")
    _add_arguments(parser)
    parser.set_defaults(run=run_report)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="runs/<run-id> as fetched by the logs role")
    parser.add_argument("--no-plot", action="store_true", help="print the summary only")


def run_report(args: argparse.Namespace) -> int:
    try:
        runs = load_run(args.run_dir)
    except MetricsFileError as exc:
        print(f"smolcluster: error: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print(
            f"smolcluster: error: {args.run_dir}: -: no <host>.jsonl metrics found", file=sys.stderr
        )
        return 2
    for line in summary_lines(runs):
        print(line)
    if not args.no_plot:
        print(f"report: {render_png(runs, args.run_dir / 'report.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smolcluster report", description=__doc__)
    _add_arguments(parser)
    return run_report(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
