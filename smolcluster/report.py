"""`smolcluster report <run-dir>`: summary table and report.png for a fetched run.

The logs role fetches each host's files into <run-dir>/<host>/; this reads every
<host>.jsonl found there, prints one summary line per host and draws loss and
accuracy curves per host into <run-dir>/report.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class HostRun:
    host: str
    role: str = "?"
    loss: list[tuple[int, float]] = field(default_factory=list)
    accuracy: list[tuple[int, float]] = field(default_factory=list)
    summary: dict[str, Any] | None = None


def load_run(run_dir: Path) -> list[HostRun]:
    """Every host's metrics under run_dir (one level of host directories, or flat)."""
    runs = []
    for path in sorted(run_dir.glob("*/*.jsonl")) or sorted(run_dir.glob("*.jsonl")):
        runs.append(_load_host(path))
    return runs


def _load_host(path: Path) -> HostRun:
    run = HostRun(host=path.stem)
    for raw in path.read_text().splitlines():
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        kind = event.get("event")
        if kind == "start":
            run.role = event.get("role", run.role)
        elif kind == "step" and event.get("loss") is not None:
            run.loss.append((event["step"], event["loss"]))
        elif kind == "eval" and event.get("val_accuracy") is not None:
            run.accuracy.append((event["step"], event["val_accuracy"]))
        elif kind == "summary":
            run.summary = event
    return run


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
            + ("" if run.summary else "  (no summary: job did not finish)")
        )
    return lines


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_png(runs: list[HostRun], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on the controller
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        if run.loss:
            loss_ax.plot(*zip(*run.loss, strict=True), label=f"{run.host} ({run.role})")
        if run.accuracy:
            acc_ax.plot(*zip(*run.accuracy, strict=True), marker="o", label=run.host)
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    acc_ax.set(title="validation accuracy", xlabel="step", ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        if ax.lines:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("report", help="summarise a fetched run and draw report.png")
    _add_arguments(parser)
    parser.set_defaults(run=run_report)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="runs/<run-id> as fetched by the logs role")
    parser.add_argument("--no-plot", action="store_true", help="print the summary only")


def run_report(args: argparse.Namespace) -> int:
    runs = load_run(args.run_dir)
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
