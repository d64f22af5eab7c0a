"""The benchmark suite: smolcluster's socket trainer against torch.distributed (gloo) DDP.

    python -m benchmarks.run --workers 2 3 4 --steps 100
    python -m benchmarks.run --quick          # a couple of minutes

Same model (SimpleNN), same batch per worker, same seeded shards, N workers on 127.0.0.1, one
thread per process, every run started through smolcluster/harness.py as the tests start
theirs. Prints (as Markdown) every table of docs/benchmarks.md: end to end with ratios to
gloo (bytes on the wire included), the exchange alone, time-to-accuracy and the elastic
study. --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import elastic_study, exchange, links, rss
from benchmarks.common import (
    REPO,
    default_data_root,
    fmt,
    prepare_data,
    table,
    time_to_accuracy,
)
from benchmarks.results import RunResult, grad_bytes
from benchmarks.runs import run_gloo, run_socket

GLOO = "gloo DDP"
PARTS = ["e2e", "exchange", "tta", "study"]  # --only


def machine() -> dict[str, str]:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "commit": _git_rev(),
    }


def _git_rev() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                check=False,
                cwd=REPO,
            ).stdout.strip()
            or "?"
        )
    except OSError:
        return "?"


def _modes(a: argparse.Namespace) -> dict[str, Callable[..., RunResult]]:
    """Each mode as fn(n, steps, out, **overrides) -> RunResult, filtered by --modes."""

    def socket(label: str, **mode: Any) -> Callable[..., RunResult]:
        return lambda n, steps, out, **kw: run_socket(
            label, n, steps, a.batch_size, a.data_root, out, threads=a.threads, **mode, **kw
        )

    elastic = f"elastic K={a.local_steps}"
    modes: dict[str, Callable[..., RunResult]] = {
        "sync fp32": socket("sync fp32"),
        "sync int8": socket("sync int8", quantize=True),
        elastic: socket(elastic, mode="elastic", update_interval=a.local_steps),
        GLOO: lambda n, steps, out, **kw: run_gloo(
            n, steps, a.batch_size, a.data_root, out, threads=a.threads, **kw
        ),
    }
    return {
        m: f for m, f in modes.items() if a.modes is None or m.split()[0] in a.modes or m in a.modes
    }


def end_to_end_table(results: list[RunResult]) -> str:
    gloo = {r.workers: r for r in results if r.mode == GLOO}
    rows = []
    for r in results:
        ref = gloo.get(r.workers)
        ratio = r.samples_per_s / ref.samples_per_s if ref else float("nan")
        cpu = r.cpu_ms_per_step / ref.cpu_ms_per_step if ref else float("nan")
        rows.append(
            [
                r.mode,
                str(r.workers),
                fmt(r.step_ms_median),
                fmt(r.step_ms_p90),
                fmt(r.samples_per_s, ".0f"),
                fmt(ratio, ".2f"),
                fmt(r.cpu_ms_per_step),
                fmt(cpu, ".2f"),
                fmt(r.sent_per_step, ",.0f"),
                fmt(r.sent_ratio, ".4f"),
                fmt(r.recv_per_step, ",.0f"),
                fmt(100 * r.comm_fraction, ".0f"),
            ]
        )
    header = (
        "mode|N|step ms p50|step ms p90|samples/s|x gloo|CPU ms/step|CPU x gloo|"
        "B sent/worker/step|÷ fp32 grads|B recv/worker/step|comm %"
    )
    return table(header, rows)


def exchange_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        out.append(
            [
                f"{r['bytes']:,}",
                str(r["n"]),
                fmt(1e3 * r["ours"]["median_s"], ".2f"),
                fmt(1e3 * r["ours"]["p90_s"], ".2f"),
                fmt(1e3 * r["gloo"]["median_s"], ".2f"),
                fmt(1e3 * r["gloo"]["p90_s"], ".2f"),
                fmt(r["ratio"], ".2f"),
            ]
        )
    return table("bytes|N|ours ms p50|ours ms p90|gloo ms p50|gloo ms p90|ours ÷ gloo", out)


def tta_table(rows: list[dict[str, Any]]) -> str:
    gloo = next((r for r in rows if r["mode"] == GLOO and r["seconds"] is not None), None)
    out = []
    for r in rows:
        ratio = (
            r["seconds"] / gloo["seconds"] if gloo and r["seconds"] is not None else float("nan")
        )
        out.append(
            [
                r["mode"],
                str(r["workers"]),
                f"{r['target']:.2f}",
                str(r["step"]) if r["step"] is not None else "not reached",
                fmt(r["seconds"], ".2f"),
                fmt(ratio, ".2f"),
                fmt(r["final_accuracy"], ".3f"),
                str(r["steps_run"]),
            ]
        )
    return table("mode|N|target acc|step reached|seconds|x gloo|final acc|steps run", out)


def run_tta(
    a: argparse.Namespace, modes: dict[str, Callable[..., RunResult]], work: Path
) -> list[dict[str, Any]]:
    rows = []
    for mode, fn in modes.items():
        out = work / "tta" / mode.replace(" ", "-")
        r = fn(
            a.tta_workers, a.tta_max_steps, out, epochs=a.tta_epochs, eval_steps=a.tta_eval_steps
        )
        lead_in = a.local_steps * r.step_ms_median / 1e3 if mode.startswith("elastic") else 0.0
        hit = time_to_accuracy(
            r.steps_events, r.evals, a.tta_accuracy, lead_in if math.isfinite(lead_in) else 0.0
        )
        if hit and mode.startswith("elastic"):
            # Elastic evals are numbered by merges; report sync-equivalent steps (samples / Nb).
            merged = next((e["samples"] for e in r.steps_events if e["step"] == hit[0]), None)
            hit = (merged // (a.tta_workers * a.batch_size), hit[1]) if merged else hit
        rows.append(
            {
                "mode": mode,
                "workers": a.tta_workers,
                "target": a.tta_accuracy,
                "step": hit[0] if hit else None,
                "seconds": hit[1] if hit else None,
                "final_accuracy": r.final_accuracy,
                "steps_run": r.steps,
            }
        )
        print(f"  tta {mode}: {rows[-1]}", flush=True)
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workers", type=int, nargs="+", help="N values (default 2 3 4; quick: 3)")
    p.add_argument("--steps", type=int, help="steps per end-to-end run (default 100; quick: 30)")
    p.add_argument("--quick", action="store_true", help="small sizes: a couple of minutes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--local-steps", type=int, default=50, help="elastic K")
    p.add_argument("--modes", nargs="+", help="subset: sync int8 elastic gloo")
    p.add_argument(
        "--exchange-bytes",
        type=int,
        nargs="+",
        help="sizes for the exchange microbenchmark (default: the model's gradients)",
    )
    p.add_argument("--exchange-iters", type=int, help="default 100; quick: 30")
    p.add_argument("--tta-accuracy", type=float, default=0.90)
    p.add_argument("--tta-workers", type=int, default=3)
    p.add_argument("--tta-epochs", type=int, help="default 4; quick: 1")
    p.add_argument("--tta-eval-steps", type=int, default=10)
    p.add_argument("--tta-max-steps", type=int, default=1_000_000, help="cap each TTA run")
    p.add_argument("--no-tta", action="store_true")
    p.add_argument("--only", nargs="+", choices=PARTS, help="run just these tables' parts")
    p.add_argument(
        "--no-rss", action="store_true", help="skip the peak RSS table (benchmarks/rss.py)"
    )
    p.add_argument(
        "--study",
        nargs="*",
        choices=list(elastic_study.PARTS),
        help="elastic study parts (benchmarks/elastic_study.py; default all, quick: none)",
    )
    p.add_argument("--study-epochs", type=int, default=2)
    p.add_argument("--study-k", type=int, default=10, help="elastic K in the study")
    p.add_argument("--study-max-steps", type=int, default=1_000_000)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--work-dir", type=Path, help="keep logs and metrics here (default: temp)")
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument(
        "--links",
        nargs="+",
        metavar="PROFILE",
        help="instead of loopback: run the end-to-end modes across throwaway network namespaces "
        f"with these link profiles ({', '.join(links.PROFILES)} or all; needs root; "
        "benchmarks/links.py)",
    )
    a = p.parse_args(argv)
    a.workers = a.workers or ([3] if a.quick else [2, 3, 4])
    a.steps = a.steps or (30 if a.quick else 100)
    a.exchange_iters = a.exchange_iters or (30 if a.quick else 100)
    a.exchange_bytes = a.exchange_bytes or [grad_bytes()]
    a.tta_epochs = a.tta_epochs or (1 if a.quick else 4)
    if a.study is None:
        a.study = [] if a.quick else list(elastic_study.PARTS)
    only = set(a.only or PARTS)
    a.workers = a.workers if "e2e" in only or a.links else []
    a.exchange_bytes = a.exchange_bytes if "exchange" in only else []
    a.no_tta = a.no_tta or "tta" not in only
    a.study = a.study if "study" in only else []
    a.data_root = (a.data_root or default_data_root()).resolve()
    return a


def link_wire_table(runs: list[links.LinkRun]) -> str:
    rows = []
    for run in runs:
        r = run.result
        where, payload = links.busiest_payload(run)
        floor = links.transfer_floor_ms(run) if math.isfinite(run.rate_bytes_per_s) else None
        end, wire = run.busiest()
        rows.append(
            [
                r.mode,
                str(r.workers),
                where,
                fmt(payload, ",.0f"),
                fmt(floor, ".1f"),
                fmt(r.step_ms_median),
                fmt(r.step_ms_median / floor if floor else None, ".2f"),
                f"{wire / 1e6:,.1f} ({end})" if wire else "- (no shaper)",
            ]
        )
    header = (
        "mode|N|busiest link|payload B/step on it|rate floor ms/step|step ms p50|p50 ÷ floor|"
        "MB through busiest shaper, whole run"
    )
    return table(header, rows)


def write_json(
    path: Path,
    info: dict[str, str],
    dataset: str,
    argv: list[str],
    **sections: Any,
) -> None:
    """All results of one invocation, with the machine, data and command they came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": info, "dataset": dataset, "argv": argv, "grad_bytes": grad_bytes()}
    path.write_text(json.dumps({**record, **sections}, indent=2))


def main_links(
    a: argparse.Namespace,
    profiles: list[links.Profile],
    info: dict[str, str],
    dataset: str,
    argv: list[str],
) -> int:
    """--links: the end-to-end modes inside network namespaces, one table per link profile."""
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="smolcluster-bench-"))
    try:
        modes = _modes(a)
        runs = links.run_profiles(profiles, a.workers, a.steps, modes, work, GLOO)
    finally:
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    left = links.our_namespaces()
    print(f"\nnamespaces with prefix {links.PREFIX} left: {left or 'none'}")
    for profile in profiles:
        mine = [r for r in runs if r.profile == profile.key]
        if not mine:
            continue
        print(f"\n## Links: {profile.label} (x gloo = samples/s ratio, same profile, same run)\n")
        print(f"shaping: {mine[0].shaping}\n")
        print(end_to_end_table([r.result for r in mine]))
        print()
        print(link_wire_table(mine))
    print(
        "\npayload B/step: the busiest link direction's bytes per step from the trainers' byte"
        " counters (socket: N x a worker's, on the server's link; gloo ring: one rank's);"
        " elastic: per local step, amortised over pushes. rate floor = that ÷ the profile's"
        " rate (the least step time the link allows). MB through busiest shaper: bytes the"
        " busiest cable end's qdisc sent during the whole run (headers, set-up and initial"
        " weights included; 'up' = host -> switch, 'down' = switch -> host; h0 = the server,"
        " gloo: rank 0)."
    )
    if a.json:
        write_json(
            a.json,
            info,
            dataset,
            argv,
            netem=any(r.shaping.startswith("netem") for r in runs),
            links=[r.as_dict() for r in runs],
            namespaces_left=left,
        )
    return 1 if left else 0


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    argv = sys.argv[1:] if argv is None else argv
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
    notes: list[str] = []
    info = machine()
    dataset = prepare_data(a.data_root)
    print(f"# smolcluster benchmarks, {info['date']}", flush=True)
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu']}, torch {info['torch']}, "
        f"python {info['python']}, {info['os']}"
    )
    print(
        f"dataset: {dataset}; model SimpleNN ({grad_bytes():,} B of fp32 gradients); batch "
        f"{a.batch_size} per worker; {a.threads} torch thread(s) per process; "
        + ("network namespaces (benchmarks/links.py)" if a.links else "loopback only")
    )
    if a.links:
        return main_links(a, profiles, info, dataset, argv)
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="smolcluster-bench-"))
    try:
        modes = _modes(a)
        results: list[RunResult] = []
        for n in a.workers:
            for mode, fn in modes.items():
                print(f"  running {mode} N={n} ({a.steps} steps)", flush=True)
                results.append(fn(n, a.steps, work / "e2e" / f"{mode.replace(' ', '-')}-{n}"))
        xchg = []
        for nbytes in a.exchange_bytes:
            print(f"  exchange microbenchmark: {nbytes:,} B at N=3", flush=True)
            xchg.append(exchange.measure(3, nbytes, a.exchange_iters, work / "xchg", a.data_root))
            if abs(xchg[-1]["bytes"] - nbytes) > nbytes / 20:
                notes.append(
                    f"exchange: no SimpleNN has {nbytes:,} B of gradients; measured the "
                    f"closest, {xchg[-1]['bytes']:,} B"
                )
        tta = [] if a.no_tta else run_tta(a, modes, work)
        study_opts = elastic_study.Options(
            workers=a.tta_workers,
            epochs=a.study_epochs,
            k=a.study_k,
            batch_size=a.batch_size,
            max_steps=a.study_max_steps,
            data_root=a.data_root,
        )
        study = elastic_study.run_parts(a.study, study_opts, work)
        rss_rows, rss_notes = ([], []) if a.no_rss else rss.measure_all(REPO, work / "rss")
        notes += rss_notes
    finally:
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    if results:
        print("\n## End to end (median over steps after warm-up; x gloo = samples/s ratio)\n")
        print(end_to_end_table(results))
        print(
            "\nCPU ms/step: user+system CPU of all the run's processes per step (from /proc),"
            " steady state; it moves far less than wall time when other jobs share the cores."
        )
        print(f"comm %: {'; '.join(sorted({f'{r.mode}: {r.comm_how}' for r in results}))}")
    if xchg:
        print("\n## Exchange only: average B bytes of fp32 across N=3 processes\n")
        print(exchange_table(xchg))
    if tta:
        print(
            f"\n## Time to {a.tta_accuracy:.0%} test accuracy on the offline digits "
            f"(N={a.tta_workers}, eval every {a.tta_eval_steps} steps)\n"
        )
        print(tta_table(tta))
    if study:
        print("\n" + elastic_study.report(study, study_opts))
    if rss_rows:
        print("\n" + rss.report(rss_rows))
    for line in notes:
        print(line)
    if a.json:
        write_json(
            a.json,
            info,
            dataset,
            argv,
            notes=notes,
            end_to_end=[r.as_dict() for r in results],
            exchange=xchg,
            tta=tta,
            study=[asdict(r) for r in study],
            rss=rss.as_dicts(rss_rows),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
