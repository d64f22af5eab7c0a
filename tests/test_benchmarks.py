"""The benchmark harness runs end to end at tiny size (not timed: only shape and sanity)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import percentile, time_to_accuracy
from benchmarks.run import table

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_harness_end_to_end(tmp_path: Path, offline_digits_root: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--workers",
            "2",
            "--steps",
            "8",
            "--exchange-iters",
            "5",
            "--tta-accuracy",
            "0.3",
            "--tta-eval-steps",
            "5",
            "--tta-max-steps",
            "15",
            "--local-steps",
            "4",
            "--study",
            "slow",
            "--study-epochs",
            "1",
            "--study-max-steps",
            "12",
            "--study-k",
            "4",
            "--data-root",
            str(offline_digits_root),
            "--work-dir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for heading in (
        "## End to end",
        "## Exchange only",
        "## Time to 30% test accuracy",
        "## Goals",
    ):
        assert heading in text, text
    for mode in ("sync fp32", "sync int8", "gloo DDP"):
        assert re.search(rf"^\| {mode} +\| 2 +\|", text, re.MULTILINE), text

    report = json.loads(out.read_text())
    rows = {r["mode"]: r for r in report["end_to_end"]}
    assert {"sync fp32", "sync int8", "gloo DDP"} <= set(rows)
    for row in rows.values():
        assert row["workers"] == 2 and row["steps"] >= 8
        for key in (
            "step_ms_median",
            "step_ms_p90",
            "samples_per_s",
            "sent_per_step",
            "recv_per_step",
        ):
            assert row[key] > 0 and math.isfinite(row[key]), (row["mode"], key, row)
        assert row["step_ms_p90"] >= row["step_ms_median"]
        if not row["mode"].startswith("elastic"):  # elastic: no per-step comm split
            assert row["steps"] == 8
            assert 0 <= row["comm_fraction"] <= 1
    # Wire volume is structural, so it can be checked exactly even on a busy machine:
    # fp32 sends the gradients plus ~100 B of framing, int8 a quarter plus block scales,
    # and gloo's ring all-reduce at N=2 moves 2 (N-1)/N = 1x the gradients each way.
    assert 1.0 <= rows["sync fp32"]["sent_ratio"] <= 1.01
    assert 1.0 <= rows["sync fp32"]["recv_ratio"] <= 1.01
    assert 0.25 <= rows["sync int8"]["sent_ratio"] <= 0.26
    assert 0.95 <= rows["gloo DDP"]["sent_ratio"] <= 1.1
    if "elastic K=4" in rows:  # one push of the weight delta every K = 4 local steps
        assert 0.2 <= rows["elastic K=4"]["sent_ratio"] <= 0.3

    (xchg,) = report["exchange"]
    assert xchg["n"] == 3 and xchg["bytes"] == report["grad_bytes"]
    assert xchg["ours"]["median_s"] > 0 and xchg["gloo"]["median_s"] > 0
    assert 1.0 <= xchg["ours"]["wire_ratio"] <= 1.01
    assert xchg["ratio"] == pytest.approx(xchg["ours"]["median_s"] / xchg["gloo"]["median_s"])

    tta = {r["mode"]: r for r in report["tta"]}
    assert set(tta) == set(rows)
    for row in tta.values():
        # 30% is three times chance; every mode gets there within 15 steps of 2 x 32 digits.
        assert row["step"] is not None and row["step"] <= 15, row
        assert row["seconds"] > 0
    assert any("goal" in line for line in report["goals"])
    # The elastic study's slow-worker part: the same sample budget in each of its four runs.
    assert "## One worker ~5x slower" in text, text
    study = {r["label"]: r for r in report["study"]}
    assert set(study) == {"sync, no slow worker", "sync", "sync, balance auto", "elastic"}
    assert len({r["samples"] for r in study.values()}) == 1, study
    assert all(r["wall_s"] > 0 and 0 <= r["final_accuracy"] <= 1 for r in study.values())
    assert any("5x slower" in line for line in report["goals"])
    assert report["machine"]["nproc"] and report["machine"]["torch"]


def test_statistics_helpers() -> None:
    assert percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile(list(range(1, 11)), 90) == 9
    assert percentile([7], 90) == 7
    steps = [{"step": 1, "wall": 10.5, "step_time_s": 0.5}, {"step": 2, "wall": 11.0}]
    evals = [
        {"step": 1, "val_accuracy": 0.2, "wall": 10.6},
        {"step": 2, "val_accuracy": 0.95, "wall": 11.2},
    ]
    assert time_to_accuracy(steps, evals, 0.9) == (2, pytest.approx(1.2))
    assert time_to_accuracy(steps, evals, 0.99) is None
    assert table(["a", "bb"], [["1", "2"]]) == "| a | bb |\n|---|----|\n| 1 | 2  |"
