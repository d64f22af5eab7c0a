"""The benchmark suite: smolcluster's socket trainer against torch.distributed (gloo) DDP.

    python -m benchmarks.run                      # every table of docs/benchmarks.md
    python -m benchmarks.run --quick              # N=3, small sizes: a few minutes
    sudo .venv/bin/python -m benchmarks.run --links all --workers 2 3 4   # shaped links

Same model (SimpleNN), same batch per worker, same seeded shards, N workers on 127.0.0.1, one
thread per process, every run started through smolcluster/harness.py as the tests start
theirs. Each part (PARTS) measures, then prints its table (Markdown) under one header with the
commit, machine and load average; --only picks parts, --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from benchmarks import elastic_study, encryption, exchange, links, profile_sync, rss
from benchmarks.common import (
    REPO,
    default_data_root,
    fmt,
    header,
    machine,
    slug,
    table,
    time_to_accuracy,
)
from benchmarks.runs import GLOO, RunResult, end_to_end_table, grad_bytes, run_gloo, run_socket
from smolcluster.offline_digits import build_offline_digits


def mode_runners(a: argparse.Namespace) -> dict[str, Callable[..., RunResult]]:
    """Each mode as fn(n, steps, out, **overrides) -> RunResult, filtered by --modes."""

    def socket(label: str, **mode: Any) -> Callable[..., RunResult]:
        return lambda n, steps, out, **kw: run_socket(
            label, n, steps, a.batch_size, a.data_root, out, threads=a.threads, **mode, **kw
        )

    def server_trains(n: int, steps: int, out: Path, **kw: Any) -> RunResult:
        # N training processes as gloo's N ranks: the server's own shard and N - 1 workers.
        extra = {"server_trains": True, **kw.pop("extra", {})}
        label = "sync fp32, server trains"
        r = socket(label)(n - 1, steps, out, extra=extra, **kw)
        r.workers = n
        return r

    elastic = f"elastic K={a.local_steps}"
    modes: dict[str, Callable[..., RunResult]] = {
        "sync fp32": socket("sync fp32"),
        "sync fp32, server trains": server_trains,
        "sync int8": socket("sync int8", quantize=True),
        elastic: socket(elastic, mode="elastic", update_interval=a.local_steps),
        GLOO: lambda n, steps, out, **kw: run_gloo(
            n, steps, a.batch_size, a.data_root, out, threads=a.threads, **kw
        ),
    }
    words = {m: {m, *m.replace(",", " ").split()} for m in modes}  # "fp32," is the word fp32
    return {m: f for m, f in modes.items() if not a.modes or words[m] & set(a.modes)}


def measure_e2e(a: argparse.Namespace, work: Path) -> list[RunResult]:
    results = []
    for n in a.workers:
        for mode, fn in mode_runners(a).items():
            print(f"  running {mode} N={n} ({a.steps} steps)", flush=True)
            results.append(fn(n, a.steps, work / f"{slug(mode)}-{n}"))
    return results


def report_e2e(results: list[RunResult], a: argparse.Namespace) -> str:
    how = "; ".join(sorted({f"{r.mode}: {r.comm_how}" for r in results}))
    return (
        "## End to end (median over steps after warm-up; x gloo = samples/s ratio)\n\n"
        f"{end_to_end_table(results)}\n\nCPU ms/step: user+system CPU of all the run's processes"
        " per step (from /proc), steady state; it moves far less than wall time when other jobs"
        f" share the cores.\ncomm %: {how}"
    )


def measure_tta(a: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows = []
    for mode, fn in mode_runners(a).items():
        r = fn(a.tta_workers, a.tta_max_steps, work / slug(mode),
               epochs=a.tta_epochs, eval_steps=a.tta_eval_steps)  # fmt: skip
        elastic = mode.startswith("elastic")
        lead_in = a.local_steps * r.step_ms_median / 1e3 if elastic else 0.0
        hit = time_to_accuracy(
            r.steps_events, r.evals, a.tta_accuracy, lead_in if math.isfinite(lead_in) else 0.0
        )
        if hit and elastic:
            # Elastic evals are numbered by merges; report sync-equivalent steps (samples / Nb).
            merged = next((e["samples"] for e in r.steps_events if e["step"] == hit[0]), None)
            hit = (merged // (a.tta_workers * a.batch_size), hit[1]) if merged else hit
        rows.append({"mode": mode, "workers": a.tta_workers, "target": a.tta_accuracy,
                     "step": hit and hit[0], "seconds": hit and hit[1],
                     "final_accuracy": r.final_accuracy, "steps_run": r.steps})  # fmt: skip
        print(f"  tta {mode}: {rows[-1]}", flush=True)
    return rows


def report_tta(rows: list[dict[str, Any]], a: argparse.Namespace) -> str:
    gloo = next((r["seconds"] for r in rows if r["mode"] == GLOO and r["seconds"]), None)
    cells = [
        [r["mode"], str(r["workers"]), f"{r['target']:.2f}",
         "not reached" if r["step"] is None else str(r["step"]), fmt(r["seconds"], ".2f"),
         fmt(r["seconds"] / gloo if gloo and r["seconds"] else None, ".2f"),
         fmt(r["final_accuracy"], ".3f"), str(r["steps_run"])]
        for r in rows
    ]  # fmt: skip
    return (
        f"## Time to {a.tta_accuracy:.0%} test accuracy on the offline digits "
        f"(N={a.tta_workers}, eval every {a.tta_eval_steps} steps)\n\n"
        + table("mode|N|target acc|step reached|seconds|x gloo|final acc|steps run", cells)
    )


# --only name -> (its --json key, measure(args, work dir), report(what measure gave, args)),
# run and printed in this order.
PARTS: dict[str, tuple[str, Callable[..., Any], Callable[..., str]]] = {
    "e2e": ("end_to_end", measure_e2e, report_e2e),
    "exchange": ("exchange", exchange.measure, exchange.report),
    "tta": ("tta", measure_tta, report_tta),
    "study": ("study", elastic_study.measure, elastic_study.report),
    "crypto": ("encryption", encryption.measure, encryption.report),
    "profile": ("profile", profile_sync.measure, profile_sync.report),
    "rss": ("rss", rss.measure, rss.report),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--workers", type=int, nargs="+", help="N values (default 2 3 4; quick: 3)")
    add("--steps", type=int, help="steps per end-to-end run (default 100; quick: 30)")
    add("--quick", action="store_true", help="small sizes, no study, no profile, no RSS")
    add("--only", nargs="+", choices=list(PARTS), help="run just these parts (tables)")
    add("--batch-size", type=int, default=32)
    add("--threads", type=int, default=1, help="torch threads per process")
    add("--local-steps", type=int, default=50, help="elastic K")
    add("--modes", nargs="+", help="subset: sync int8 elastic gloo")
    add("--exchange-bytes", type=int, nargs="+", help="default: the model's gradients")
    add("--exchange-iters", type=int, help="default 100; quick: 30")
    add("--tta-accuracy", type=float, default=0.90)
    add("--tta-workers", type=int, default=3)
    add("--tta-epochs", type=int, help="default 4; quick: 1")
    add("--tta-eval-steps", type=int, default=10)
    add("--tta-max-steps", type=int, default=1_000_000, help="cap each TTA run")
    add("--crypto-rounds", type=int, default=3, help="encryption on/off runs of each (N=3)")
    add("--study", nargs="*", choices=list(elastic_study.PARTS), help="default all")
    add("--study-epochs", type=int, default=2)
    add("--study-k", type=int, default=10, help="elastic K in the study")
    add("--study-max-steps", type=int, default=1_000_000)
    add("--profile-seconds", type=float, default=8.0, help="py-spy window per checkout")
    add("--code", type=Path, nargs="+", default=[REPO],
        help="checkouts whose trainer the profile (interleaved) and RSS parts run")  # fmt: skip
    add("--data-root", type=Path, default=None)
    add("--work-dir", type=Path, help="keep logs and metrics here (default: temp)")
    add("--json", type=Path, help="write all results here")
    add("--links", nargs="+", metavar="PROFILE",
        help="the end-to-end modes across throwaway network namespaces with these link profiles "
        f"({', '.join(links.PROFILES)} or all; needs root; benchmarks/links.py)")  # fmt: skip
    a = p.parse_args(argv)
    chosen = set(a.only or [*PARTS][: 5 if a.quick else None])
    a.parts = [part for part in PARTS if part in chosen]
    a.workers = a.workers or ([3] if a.quick else [2, 3, 4])
    a.workers = a.workers if "e2e" in a.parts or a.links else []
    a.steps = a.steps or (30 if a.quick else 100)
    a.exchange_bytes = a.exchange_bytes or [grad_bytes()]
    a.exchange_iters = a.exchange_iters or (30 if a.quick else 100)
    a.tta_epochs = a.tta_epochs or (1 if a.quick else 4)
    a.study = ([] if a.quick else list(elastic_study.PARTS)) if a.study is None else a.study
    a.data_root = (a.data_root or default_data_root()).resolve()
    a.code = [c.resolve() for c in a.code]
    return a


def jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


def run_parts(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every chosen loopback part, then every table; returns the --json sections."""
    measured = {name: PARTS[name][1](a, work / name) for name in a.parts}
    for name, data in measured.items():
        if data:
            print(f"\n{PARTS[name][2](data, a)}")
    return {PARTS[name][0]: jsonable(data) for name, data in measured.items()}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    profiles: list[links.Profile] = []
    if a.links:  # before the data and torch: refuse at once
        try:
            profiles = links.choose_profiles(a.links)
            why = links.unavailable_reason()
        except ValueError as e:
            why = str(e)
        if why:
            print(f"benchmarks.run: error: {why}", file=sys.stderr)
            return 2
    info = machine()
    dataset = build_offline_digits(a.data_root).source
    print(header(info), flush=True)
    print(
        f"dataset: {dataset}; model SimpleNN ({grad_bytes():,} B of fp32 gradients); batch "
        f"{a.batch_size} per worker; {a.threads} torch thread(s) per process; "
        + ("network namespaces (benchmarks/links.py)" if a.links else "loopback only")
    )
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="smolcluster-bench-"))
    try:
        if a.links:
            runs = links.run_profiles(profiles, a.workers, a.steps, mode_runners(a), work, GLOO)
            sections = links.report(runs, profiles)
        else:
            sections = run_parts(a, work)
    finally:
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        argv = sys.argv[1:] if argv is None else argv
        record = {"machine": info, "dataset": dataset, "argv": argv, "grad_bytes": grad_bytes()}
        a.json.write_text(json.dumps({**record, **sections}, indent=2))
    return 1 if sections.get("namespaces_left") else 0


if __name__ == "__main__":
    raise SystemExit(main())
