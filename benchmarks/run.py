"""The benchmark suite: smolcluster's socket trainer against torch.distributed (gloo) DDP.

    python -m benchmarks.run                      # every table of docs/benchmarks.md
    python -m benchmarks.run --quick              # N=3, small sizes: a few minutes
    sudo .venv/bin/python -m benchmarks.run --links all --workers 2 3 4   # shaped links

Same model (SimpleNN), same batch per worker, same seeded shards, N workers on 127.0.0.1, one
thread per process, every run started through smolcluster/harness.py as the tests start
theirs. Prints (as Markdown), under a header with the commit, machine and load average: end to
end with ratios to gloo (bytes on the wire included), the exchange alone, time-to-accuracy,
the elastic study, encryption on against off, the per-process profile (py-spy) and the peak
RSS.
--only picks parts; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import elastic_study, encryption, exchange, links, profile_sync, rss
from benchmarks.common import (
    REPO,
    default_data_root,
    fmt,
    header,
    machine,
    table,
    time_to_accuracy,
)
from benchmarks.runs import RunResult, grad_bytes, run_gloo, run_socket
from smolcluster.offline_digits import build_offline_digits

GLOO = "gloo DDP"
PARTS = ["e2e", "exchange", "tta", "study", "crypto", "profile", "rss"]  # --only


def mode_runners(a: argparse.Namespace) -> dict[str, Callable[..., RunResult]]:
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
    return {m: f for m, f in modes.items() if not a.modes or {m, *m.split()} & set(a.modes)}


def end_to_end_table(results: list[RunResult]) -> str:
    gloo = {r.workers: r for r in results if r.mode == GLOO}
    rows = []
    for r in results:
        ref = gloo.get(r.workers)
        ratio = r.samples_per_s / ref.samples_per_s if ref else None
        cpu = r.cpu_ms_per_step / ref.cpu_ms_per_step if ref else None
        rows.append(
            [r.mode, str(r.workers), fmt(r.step_ms_median), fmt(r.step_ms_p90),
             fmt(r.samples_per_s, ".0f"), fmt(ratio, ".2f"), fmt(r.cpu_ms_per_step),
             fmt(cpu, ".2f"), fmt(r.sent_per_step, ",.0f"), fmt(r.sent_ratio, ".4f"),
             fmt(r.recv_per_step, ",.0f"), fmt(100 * r.comm_fraction, ".0f")]
        )  # fmt: skip
    return table(
        "mode|N|step ms p50|step ms p90|samples/s|x gloo|CPU ms/step|CPU x gloo|"
        "B sent/worker/step|÷ fp32 grads|B recv/worker/step|comm %",
        rows,
    )


def exchange_table(rows: list[dict[str, Any]]) -> str:
    ms = [[1e3 * r[k][q] for k in ("ours", "gloo") for q in ("median_s", "p90_s")] for r in rows]
    cells = [[f"{r['bytes']:,}", str(r["n"]),
              *(fmt(v, ".2f") for v in (*m, r["ratio"], 1e3 * r["ours"]["wait_median_s"],
                                        r["wait_ratio"]))]
             for r, m in zip(rows, ms, strict=True)]  # fmt: skip
    return table("bytes|N|ours ms p50|ours ms p90|gloo ms p50|gloo ms p90|ours ÷ gloo"
                 "|worker wait ms p50|wait ÷ gloo", cells)  # fmt: skip


def tta_table(rows: list[dict[str, Any]]) -> str:
    gloo = next((r["seconds"] for r in rows if r["mode"] == GLOO and r["seconds"]), None)
    cells = [
        [r["mode"], str(r["workers"]), f"{r['target']:.2f}",
         "not reached" if r["step"] is None else str(r["step"]), fmt(r["seconds"], ".2f"),
         fmt(r["seconds"] / gloo if gloo and r["seconds"] else None, ".2f"),
         fmt(r["final_accuracy"], ".3f"), str(r["steps_run"])]
        for r in rows
    ]  # fmt: skip
    return table("mode|N|target acc|step reached|seconds|x gloo|final acc|steps run", cells)


def run_tta(
    a: argparse.Namespace, modes: dict[str, Callable[..., RunResult]], work: Path
) -> list[dict[str, Any]]:
    rows = []
    for mode, fn in modes.items():
        out = work / "tta" / mode.replace(" ", "-")
        r = fn(
            a.tta_workers, a.tta_max_steps, out, epochs=a.tta_epochs, eval_steps=a.tta_eval_steps
        )
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
    add("--only", nargs="+", choices=PARTS, help="run just these parts (tables)")
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
    only = set(a.only or (PARTS[:5] if a.quick else PARTS))
    a.workers = a.workers or ([3] if a.quick else [2, 3, 4])
    a.steps = a.steps or (30 if a.quick else 100)
    a.exchange_iters = a.exchange_iters or (30 if a.quick else 100)
    a.tta_epochs = a.tta_epochs or (1 if a.quick else 4)
    a.workers = a.workers if "e2e" in only or a.links else []
    a.exchange_bytes = (a.exchange_bytes or [grad_bytes()]) if "exchange" in only else []
    a.tta = "tta" in only
    a.study = ([] if a.quick else list(elastic_study.PARTS)) if a.study is None else a.study
    a.study = a.study if "study" in only else []
    a.e2e, a.crypto, a.profile, a.rss = (p in only for p in ("e2e", "crypto", "profile", "rss"))
    a.data_root = (a.data_root or default_data_root()).resolve()
    a.code = [c.resolve() for c in a.code]
    return a


def link_wire_table(runs: list[links.LinkRun]) -> str:
    rows = []
    for run in runs:
        r = run.result
        where, payload = links.busiest_payload(run)
        # the least time per step the rate allows (headers and the tbf burst ignored)
        rate = run.profile.rate_bytes_per_s
        floor = 1e3 * payload / rate if math.isfinite(rate) else None
        end, wire = run.busiest()
        rows.append(
            [r.mode, str(r.workers), where, fmt(payload, ",.0f"), fmt(floor, ".1f"),
             fmt(r.step_ms_median), fmt(r.step_ms_median / floor if floor else None, ".2f"),
             f"{wire / 1e6:,.1f} ({end})" if wire else "- (no shaper)"]
        )  # fmt: skip
    return table(
        "mode|N|busiest link|payload B/step on it|rate floor ms/step|step ms p50|p50 ÷ floor|"
        "MB through busiest shaper, whole run",
        rows,
    )


LINKS_NOTE = (
    "\npayload B/step: the busiest link direction's bytes per step from the trainers' byte"
    " counters (socket: N x a worker's, on the server's link; gloo ring: one rank's);"
    " elastic: per local step, amortised over pushes. rate floor = that ÷ the profile's"
    " rate (the least step time the link allows). MB through busiest shaper: bytes the"
    " busiest cable end's qdisc sent during the whole run (headers, set-up and initial"
    " weights included; 'up' = host -> switch, 'down' = switch -> host; h0 = the server,"
    " gloo: rank 0)."
)


def run_links(a: argparse.Namespace, profiles: list[links.Profile], work: Path) -> dict:
    """--links: the end-to-end modes inside network namespaces, one table per link profile."""
    runs = links.run_profiles(profiles, a.workers, a.steps, mode_runners(a), work, GLOO)
    left = links.our_namespaces()
    print(f"\nnamespaces with prefix {links.PREFIX} left: {left or 'none'}")
    for profile in profiles:
        mine = [r for r in runs if r.profile == profile]
        if mine:
            print(f"\n## Links: {profile.label} (x gloo = samples/s ratio, same profile, same run)")
            print(f"\nshaping: {mine[0].shaping}\n\n{end_to_end_table([r.result for r in mine])}")
            print(f"\n{link_wire_table(mine)}")
    print(LINKS_NOTE)
    return {"links": [r.as_dict() for r in runs], "namespaces_left": left}


def run_parts(a: argparse.Namespace, work: Path) -> dict:
    """Every loopback part, then every table; returns the --json sections."""
    modes, notes = mode_runners(a), []
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
            notes.append(f"exchange: no SimpleNN has {nbytes:,} B of gradients; measured the "
                         f"closest, {xchg[-1]['bytes']:,} B")  # fmt: skip
    tta = run_tta(a, modes, work) if a.tta else []
    study = elastic_study.run_parts(a, work)
    crypto = (
        encryption.measure(
            a.steps, a.batch_size, a.data_root, work / "crypto", a.crypto_rounds, a.threads
        )
        if a.crypto
        else None
    )
    profiles = []
    if a.profile and profile_sync.pyspy_path() is None:
        notes.append("profile: skipped, py-spy is not installed (the dev extra)")
    elif a.profile:
        for i, code in enumerate(a.code):
            print(f"  profile of {code} ({a.profile_seconds:.0f} s)", flush=True)
            out = work / "profile" / str(i)
            profiles.append(profile_sync.profile(code, 3, a.profile_seconds, 250, out, a.data_root))
    rss_rows = []
    for i, code in enumerate(a.code if a.rss else []):
        rows, rss_notes = rss.measure_all(code, work / "rss" / str(i), a.data_root)
        rss_rows.append(rows)
        notes += [f"{code}: {note}" for note in rss_notes]

    if results:
        print("\n## End to end (median over steps after warm-up; x gloo = samples/s ratio)\n")
        print(end_to_end_table(results))
        print(
            "\nCPU ms/step: user+system CPU of all the run's processes per step (from /proc),"
            " steady state; it moves far less than wall time when other jobs share the cores."
        )
        print(f"comm %: {'; '.join(sorted({f'{r.mode}: {r.comm_how}' for r in results}))}")
    if xchg:
        print(f"\n## Exchange only: average B bytes of fp32 across N=3 processes\n\n"
              f"{exchange_table(xchg)}")  # fmt: skip
    if tta:
        print(
            f"\n## Time to {a.tta_accuracy:.0%} test accuracy on the offline digits "
            f"(N={a.tta_workers}, eval every {a.tta_eval_steps} steps)\n\n{tta_table(tta)}"
        )
    if study:
        print("\n" + elastic_study.report(study, a))
    if crypto:
        print(f"\n## Encryption on vs off: sync fp32 at N={encryption.N} (medians, same run)\n\n"
              f"{encryption.report(crypto)}")  # fmt: skip
    for text in profiles:
        print(f"\n## Where a sync step's time goes, per process (py-spy)\n\n{text}")
    for code, rows in zip(a.code, rss_rows, strict=False):
        print(f"\n{rss.report(rows)}\n\ntrainer code: {code}")
    for line in notes:
        print(line)
    rss_dicts = [[asdict(r) for r in rows] for rows in rss_rows]
    return {"notes": notes, "end_to_end": [r.as_dict() for r in results], "exchange": xchg,
            "tta": tta, "study": [asdict(r) for r in study], "encryption": crypto,
            "profile": profiles, "rss": rss_dicts}  # fmt: skip


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
        sections = run_links(a, profiles, work) if a.links else run_parts(a, work)
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
