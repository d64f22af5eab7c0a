"""The benchmark harness runs end to end at tiny size (not timed: only shape and sanity)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.common import (
    CpuWindow,
    cpu_marks,
    per_step_bytes,
    percentile,
    table,
    time_to_accuracy,
)

REPO = Path(__file__).resolve().parents[1]


def bench_command(data_root: Path, work: Path, *args: str) -> list[str]:
    """`python -m benchmarks.run ARGS` on the offline digits, its logs and metrics under work."""
    return [
        sys.executable, "-m", "benchmarks.run", *args,
        "--data-root", str(data_root), "--work-dir", str(work),
    ]  # fmt: skip


@pytest.mark.slow
def test_harness_end_to_end(tmp_path: Path, offline_digits_root: Path) -> None:
    out = tmp_path / "bench.json"
    args = [
        "--workers", "2", "--steps", "8", "--exchange-iters", "5",
        "--tta-accuracy", "0.3", "--tta-eval-steps", "5", "--tta-max-steps", "15",
        "--local-steps", "4", "--crypto-rounds", "1",
        "--study", "slow", "--study-epochs", "1", "--study-max-steps", "12", "--study-k", "4",
        # not rss (two N=3 runs on full MNIST; tests/test_rss_benchmark.py covers the harness)
        # nor profile (py-spy; its parser is covered below)
        "--only", "e2e", "exchange", "tta", "study", "crypto",
        # not elastic in e2e and tta (two runs): the study's slow part runs an elastic row
        "--modes", "sync fp32", "server", "int8", "gloo",
        "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        bench_command(offline_digits_root, tmp_path / "work", *args),
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
        "## Encryption on vs off",
    ):
        assert heading in text, text
    modes = ("sync fp32", "sync fp32, server trains", "sync int8", "gloo DDP")
    for mode in modes:
        assert re.search(rf"^\| {mode} +\| 2 +\|", text, re.MULTILINE), text

    report = json.loads(out.read_text())
    rows = {r["mode"]: r for r in report["end_to_end"]}
    assert set(modes) <= set(rows)
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
    # N = 2 training processes: the server and one worker, 2 x 32 samples per step as gloo's.
    trains = tmp_path / "work" / "e2e" / "sync-fp32-server-trains-2" / "metrics"
    assert sorted(p.stem for p in trains.glob("*.jsonl")) == ["mini1", "mini2"]
    assert {s["samples"] for s in map(json.loads, (trains / "mini1.jsonl").read_text().splitlines())
            if s["event"] == "step"} == {64}  # fmt: skip
    assert 1.0 <= rows["sync fp32"]["recv_ratio"] <= 1.01
    assert 0.25 <= rows["sync int8"]["sent_ratio"] <= 0.26
    assert 0.95 <= rows["gloo DDP"]["sent_ratio"] <= 1.1

    (xchg,) = report["exchange"]
    assert xchg["n"] == 3 and xchg["bytes"] == report["grad_bytes"]
    assert xchg["ours"]["median_s"] > 0 and xchg["gloo"]["median_s"] > 0
    assert 1.0 <= xchg["ours"]["wire_ratio"] <= 1.01
    assert xchg["ratio"] == pytest.approx(xchg["ours"]["median_s"] / xchg["gloo"]["median_s"])
    # The workers' side: each waits on the exchange for less than the server's whole cycle.
    assert 0 < xchg["ours"]["wait_median_s"] < xchg["ours"]["median_s"] * 1.5
    # "ours" is a real server's SyncLoop, timed per exchange (exchange_s), and three workers.
    assert xchg["ours"]["iters"] == 5
    ran = tmp_path / "work" / "exchange" / f"ours-3-{xchg['bytes']}" / "metrics"
    roles = [json.loads(p.read_text().splitlines()[-1])["role"] for p in ran.glob("*.jsonl")]
    assert sorted(roles) == ["server"] + ["worker"] * 3

    tta = {r["mode"]: r for r in report["tta"]}
    assert set(tta) == set(rows)
    for row in tta.values():
        # 30% is three times chance; every mode gets there within 15 steps of 2 x 32 digits.
        assert row["step"] is not None and row["step"] <= 15, row
        assert row["seconds"] > 0
    # The elastic study's slow-worker part: the same sample budget in each of its four runs.
    assert "## One worker ~5x slower" in text, text
    study = {r["label"]: r for r in report["study"]}
    assert set(study) == {"sync, no slow worker", "sync", "sync, balance auto", "elastic"}
    assert len({r["samples"] for r in study.values()}) == 1, study
    assert all(r["wall_s"] > 0 and 0 <= r["final_accuracy"] <= 1 for r in study.values())
    # Its elastic run pushes one weight delta every K = 4 local steps: ~1/4 of fp32 gradients
    # (on the unthrottled workers: the slow mini2 may push too few times for a per-step rate).
    elastic = tmp_path / "work" / "study" / "slow-elastic" / "metrics"
    pushes = []
    for worker in elastic.glob("mini[3-9].jsonl"):
        events = [json.loads(line) for line in worker.read_text().splitlines()]
        steps = [e for e in events if e["event"] == "step"]
        pushes.append(per_step_bytes(steps, "bytes_sent") / report["grad_bytes"])
    assert pushes and all(0.2 <= r <= 0.3 for r in pushes), pushes
    assert report["machine"]["nproc"] and report["machine"]["torch"]
    assert re.search(r"^# smolcluster benchmarks, .*, commit \w+", text, re.MULTILINE), text
    assert "load average (1, 5, 15 min)" in text, text
    # Encryption: one sync fp32 run at N=3 with each cipher and one off, the off run's
    # processes all plaintext (tests/test_plaintext.py shows the swap is in effect), with the
    # same frames on the wire; each cipher's run really sealed with it (its server log says).
    crypto = report["encryption"]
    assert (crypto["n"], crypto["steps"], crypto["rounds"]) == (3, 8, 1)
    off = crypto["off"]
    assert off["sent_per_step"] / report["grad_bytes"] == pytest.approx(1, abs=0.01)
    for cipher in ("aes-256-gcm", "chacha20-poly1305"):
        on = crypto[cipher]
        assert on["sent_per_step"] == pytest.approx(off["sent_per_step"], rel=1e-3)
        (run,) = on["runs"]
        assert run["steps"] == 8 and on["samples_per_s"] == run["samples_per_s"] > 0
        assert on["slowdown"] == pytest.approx(off["samples_per_s"] / on["samples_per_s"] - 1)
        server_log = (tmp_path / "work" / "crypto" / f"{cipher}-0" / "mini1.log").read_text()
        assert f"sealing with {cipher}" in server_log, server_log[-2000:]
        assert re.search(rf"^\| 3 +\| 8 x 1 +\| {cipher}", text, re.MULTILINE), text


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
    assert table("a|bb", [["1", "2"]]) == "| a | bb |\n|---|----|\n| 1 | 2  |"


def require_links() -> None:
    """Skip when the --links mode cannot run here (root, ip, tc, ip netns), as
    tests/lab/test_lab.py does, except under SMOLCLUSTER_REQUIRE_LAB=1 (CI runs as root) where
    that fails."""
    from benchmarks.links import unavailable_reason

    reason = unavailable_reason()
    if reason and os.environ.get("SMOLCLUSTER_REQUIRE_LAB") == "1":
        pytest.fail(f"SMOLCLUSTER_REQUIRE_LAB=1 but {reason}")
    if reason:
        pytest.skip(reason)


def bench_namespaces() -> list[str]:
    from benchmarks.links import PREFIX, our_namespaces

    return our_namespaces(PREFIX)


@pytest.mark.slow
@pytest.mark.lab
def test_links_end_to_end(tmp_path: Path, offline_digits_root: Path) -> None:
    """`--links wifi`: socket sync and gloo inside throwaway namespaces over 200 Mbit/s links.

    Nothing here is timed against a threshold that load could break: the checks are byte
    counts and a lower bound that only a link faster than its shaping could violate."""
    require_links()
    assert not bench_namespaces(), f"sclbench- namespaces exist already: {bench_namespaces()}"
    out = tmp_path / "links.json"
    args = [
        "--links", "wifi", "--workers", "2", "--steps", "8",
        "--modes", "sync fp32", "gloo", "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        bench_command(offline_digits_root, tmp_path / "work", *args),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert bench_namespaces() == []
    text = proc.stdout
    assert "## Links: Wi-Fi 200mbit" in text, text
    assert "namespaces with prefix sclbench- left: none" in text, text
    for mode in ("sync fp32", "gloo DDP"):
        assert re.search(rf"^\| {mode} +\| 2 +\|", text, re.MULTILINE), text

    report = json.loads(out.read_text())
    assert report["namespaces_left"] == []
    rows = {r["mode"]: r for r in report["links"]}
    assert set(rows) == {"sync fp32", "gloo DDP"}
    rate = 200e6 / 8
    for row in rows.values():
        assert row["profile"] == "wifi" and row["workers"] == 2 and row["steps"] == 8
        assert row["rate_bytes_per_s"] == rate
        assert row["shaping"].startswith("tbf rate 200mbit") and "NO added delay" in row["shaping"]
    sync, gloo = rows["sync fp32"], rows["gloo DDP"]
    grads = report["grad_bytes"]
    # Every fp32 step moves the gradients plus ~100 B of framing each way; gloo's ring at N=2
    # moves 1x the gradients per rank each way.
    assert 1.0 <= sync["sent_ratio"] <= 1.01 and 1.0 <= sync["recv_ratio"] <= 1.01
    assert 0.95 <= gloo["sent_ratio"] <= 1.1
    # The traffic really crossed the shaped cables: the server's (h0) switch -> host end carried
    # every worker's GRADS of every step, its host -> switch end every AVERAGE; gloo's ranks
    # (h0, h1) each sent at least a gradient's worth per step. h2 is unused at N=2 except
    # neighbour discovery.
    wire = sync["wire_bytes"]
    assert wire["h0 down"] >= 8 * 2 * sync["sent_per_step"], wire
    assert wire["h0 up"] >= 8 * 2 * sync["recv_per_step"], wire
    assert min(gloo["wire_bytes"][f"h{r} up"] for r in (0, 1)) >= 8 * grads, gloo["wire_bytes"]
    # The rate holds (a lower bound: load can only make it slower). GRADS of steps s0+1..sL-1
    # are sent after the server's step-s0 event (they answer averages sent later) and have all
    # crossed the server's shaped link before its step-sL event: N*B bytes per step at 25 MB/s.
    steps = sync["steps_events"]
    first, last = steps[1], steps[-1]
    crossed = (last["step"] - first["step"] - 1) * 2 * sync["sent_per_step"]
    floor_s = (crossed - sync["burst_bytes"]) / rate
    assert last["wall"] - first["wall"] >= floor_s > 0.3, (last["wall"] - first["wall"], floor_s)
    assert sync["step_ms_median"] > 0 and gloo["step_ms_median"] > 0


@pytest.mark.slow
@pytest.mark.lab
def test_links_sigterm_tears_down(tmp_path: Path, offline_digits_root: Path) -> None:
    """SIGTERM in the middle of a run: every process in our namespaces dies, every namespace
    goes, and the exit status says it was stopped."""
    require_links()
    from benchmarks.links import our_namespaces

    args = [
        "--links", "wifi", "--workers", "2", "--steps", "100000", "--modes", "sync fp32",
    ]  # fmt: skip
    proc = subprocess.Popen(
        bench_command(offline_digits_root, tmp_path / "work", *args),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tag = f"sclbench-{proc.pid}-"
    try:
        deadline = time.monotonic() + 120
        server = f"{tag}h0"
        while True:  # until the server process runs inside its namespace
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            names = our_namespaces(tag)
            if server in names:
                pids = subprocess.run(
                    ["ip", "netns", "pids", server], capture_output=True, text=True, check=False
                ).stdout.split()
                if pids:
                    break
            assert time.monotonic() < deadline, "the run never started its server"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert our_namespaces(tag) == [], output[-3000:]
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
        ), f"process {pid} of {server} survived"


def test_links_refuses_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not root, or an unknown profile: exit status 2 and one line saying why, before any
    namespace, data or torch."""
    from benchmarks import links, run

    assert run.main(["--links", "gbe", "nosuch"]) == 2
    assert "unknown link profile(s) ['nosuch']" in capsys.readouterr().err
    monkeypatch.setattr(links.os, "geteuid", lambda: 1000)
    assert run.main(["--links", "all"]) == 2
    assert "--links needs root" in capsys.readouterr().err
    assert [p.key for p in links.choose_profiles(["all"])] == ["veth", "tb", "gbe", "wifi"]
    assert links.PROFILES["gbe"].burst_bytes() == 117_500  # 1 ms at 940 Mbit/s
    assert links.PROFILES["wifi"].burst_bytes() == 64 * 1024  # the 64 KiB minimum


def test_parts_and_modes_chosen_by_flags() -> None:
    """--modes picks by any word of a mode's name; --quick runs no profile and no RSS."""
    from benchmarks import run

    def chosen(*modes: str) -> set[str]:
        return set(run.mode_runners(run.parse(["--modes", *modes])))

    assert chosen("int8", "gloo") == {"sync int8", "gloo DDP"}
    assert chosen("sync fp32") == {"sync fp32"}
    assert chosen("server") == {"sync fp32, server trains"}
    assert chosen("fp32") == {"sync fp32", "sync fp32, server trains"}
    quick = run.parse(["--quick"])
    assert (quick.parts, quick.workers) == (["e2e", "exchange", "tta", "study", "crypto"], [3])
    full = run.parse([])
    assert full.parts == [*run.PARTS] and full.workers == [2, 3, 4]
    assert run.parse(["--only", "rss"]).workers == []
    crypto = run.parse(["--only", "crypto"])  # its own on/off runs at N=3, not e2e
    assert (crypto.parts, crypto.workers, crypto.crypto_rounds) == (["crypto"], [], 3)


def test_the_cpu_window_closes_before_the_processes_exit() -> None:
    # A fast run: the 10 ms poll sees every 4th step, and the processes are gone right after
    # the last one. The window must still close (it used to end at the last step: no cell).
    done = {"steps": 0}
    window = CpuWindow(lambda: done["steps"], cpu_marks(100))
    for steps in range(0, 101, 4):
        done["steps"] = steps
        window.poll([os.getpid()] if steps < 100 else [2**22 + 1])  # above pid_max: gone
        sum(i * i for i in range(20_000))  # this process's CPU moves between polls
    assert window.per_step() > 0
    # A process gone at the end mark: no window, and none opened after it.
    broken = CpuWindow(lambda: done["steps"], cpu_marks(100))
    for steps, pid in ((10, os.getpid()), (92, 2**22 + 1), (96, os.getpid())):
        done["steps"] = steps
        broken.poll([pid])
    assert math.isnan(broken.per_step()) and broken.start is None


def test_a_cpu_window_shorter_than_a_clock_tick_measures_nothing() -> None:
    """Both marks passed in two polls ~a ms apart (a short, fast run on a loaded machine): the
    processes' CPU did not move by one clock tick, so the window is no number, not 0 ms (the
    end-to-end table divided by it: ZeroDivisionError in a clean-clone CI run)."""
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)  # past its start-up
        done = {"steps": 0}
        window = CpuWindow(lambda: done["steps"], (2, 6))
        for steps in (3, 7):
            done["steps"] = steps
            window.poll([idle.pid])
        assert window.end is not None and math.isnan(window.per_step()), window.end
        # ...and the table, which divides every row's CPU by gloo's, prints "-" for it.
        from benchmarks.runs import GLOO, RunResult, end_to_end_table

        cpu_ms = 1e3 * window.per_step()
        gloo = RunResult(GLOO, 2, 32, steps=8, step_ms_median=5.0, step_ms_p90=6.0,
                         samples_per_s=12_800.0, sent_per_step=0.0, recv_per_step=0.0,
                         comm_fraction=0.1, comm_how="", cpu_ms_per_step=cpu_ms)  # fmt: skip
        row = end_to_end_table([gloo]).splitlines()[-1].split("|")
        assert [c.strip() for c in row[7:9]] == ["-", "-"], row
    finally:
        idle.kill()
        idle.wait()


@pytest.mark.slow
def test_the_cpu_window_follows_the_steps_the_run_really_has(
    tmp_path: Path, offline_digits_root: Path
) -> None:
    """A step cap above one epoch (as the N = 3, 4 rows have: 100 steps asked, 93 and 70
    run): the CPU column is still measured, between marks made from the run's own steps."""
    from benchmarks.runs import run_socket

    # 9,000 digits / (2 workers x 256) = 17 steps, against 1,000,000 asked for.
    result = run_socket("sync fp32", 2, 1_000_000, 256, offline_digits_root, tmp_path)
    assert result.steps == 9000 // 512
    assert math.isfinite(result.cpu_ms_per_step) and result.cpu_ms_per_step > 0
