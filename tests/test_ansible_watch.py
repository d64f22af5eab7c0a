"""The controller-side watcher and report: real processes writing a real metrics file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from smolcluster.events import SCHEMA_VERSION
from smolcluster.metrics import Metrics
from smolcluster.report import load_run, summary_lines
from smolcluster.watch import Progress, proxy_command, ssh_settings


def _at(wall: float, event: str, **fields: object) -> dict[str, object]:
    """A record as Metrics.write makes it, `wall` seconds into the run."""
    return {"event": event, "time": 1e9 + wall, "wall": wall, **fields}


EVENTS = [
    _at(0.0, "start", schema=SCHEMA_VERSION, role="server", host="mini1", mode="sync",
        backend="socket", dataset="offline digits", workers=2, total_steps=3),
    _at(0.5, "step", step=1, epoch=0, loss=2.3, samples_per_s=10.0),
    _at(0.9, "step", step=2, epoch=0, loss=1.7, samples_per_s=10.0),
    _at(1.0, "eval", step=2, epoch=0, val_loss=1.6, val_accuracy=0.61),
    _at(1.5, "step", step=3, epoch=0, loss=1.2, samples_per_s=10.0),
    _at(2.0, "summary", role="server", host="mini1", steps=3, final_accuracy=0.7,
        final_val_loss=1.1, samples=96, samples_per_s=48.0, bytes_sent=1000, bytes_recv=900),
]  # fmt: skip


def _writer(path: Path, events: list[dict], delay: float) -> subprocess.Popen[bytes]:
    """A separate process appending events slowly, the way the server does."""
    code = textwrap.dedent(f"""
        import json, sys, time
        with open({str(path)!r}, "a") as out:
            for event in json.loads(sys.argv[1]):
                out.write(json.dumps(event) + "\\n")
                out.flush()
                time.sleep({delay})
    """)
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(events)])


def _watch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smolcluster.watch", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_watch_follows_until_summary(tmp_path: Path) -> None:
    metrics = tmp_path / "mini1.jsonl"
    writer = _writer(metrics, EVENTS, 0.2)
    try:
        result = _watch("--metrics", str(metrics), "--timeout", "30", "--interval", "0.1")
    finally:
        writer.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("step 1/3  epoch 1  loss 2.3000")
    assert "accuracy 0.6100 (step 2)" in lines[3]
    assert lines[-1].startswith("done: 3 steps, accuracy 0.7000")


def test_watch_times_out_without_summary(tmp_path: Path) -> None:
    metrics = tmp_path / "mini1.jsonl"
    metrics.write_text("".join(json.dumps(e) + "\n" for e in EVENTS[:3]))
    result = _watch("--metrics", str(metrics), "--timeout", "1", "--interval", "0.2")
    assert result.returncode == 1
    assert "no summary within" in result.stderr


def test_watch_status_is_json(tmp_path: Path) -> None:
    metrics = tmp_path / "mini1.jsonl"
    metrics.write_text("".join(json.dumps(e) + "\n" for e in EVENTS[:4]))
    status = json.loads(_watch("--status", "--metrics", str(metrics)).stdout)
    assert status["step"] == 2 and status["accuracy"] == 0.61 and status["done"] is False


def test_proxy_command_from_ansible_ssh_args() -> None:
    args = "-o StrictHostKeyChecking=yes -o ProxyCommand='ssh -W %h:%p -q jump@bastion'"
    assert proxy_command(args, "10.0.0.5", 2222, "smol") == "ssh -W 10.0.0.5:2222 -q jump@bastion"
    assert proxy_command("-oProxyJump=gw", "h", 22, None) == "ssh -W h:22 gw"
    assert proxy_command("-J gw2", "h", 22, None) == "ssh -W h:22 gw2"
    assert proxy_command("-o ServerAliveInterval=15", "h", 22, None) is None


def test_ssh_settings_honour_the_inventory() -> None:
    settings = ssh_settings(
        {
            "ansible_host": "192.168.1.11",
            "ansible_port": 2200,
            "ansible_user": "smol",
            "ansible_ssh_private_key_file": "~/.ssh/cluster",
            "ansible_ssh_common_args": '-o ProxyCommand="nc -X 5 -x proxy:1080 %h %p"',
        },
        "mini1",
    )
    assert (settings.host, settings.port, settings.user) == ("192.168.1.11", 2200, "smol")
    assert settings.key_file == "~/.ssh/cluster"
    assert settings.proxy_command == "nc -X 5 -x proxy:1080 192.168.1.11 2200"


def test_report_summary_and_png(tmp_path: Path) -> None:
    host_dir = tmp_path / "mini1"
    host_dir.mkdir()
    (host_dir / "mini1.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    runs = load_run(tmp_path)
    assert [r.host for r in runs] == ["mini1"]
    assert "accuracy 0.7000" in summary_lines(runs)[0]
    result = subprocess.run(
        [sys.executable, "-m", "smolcluster.report", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_elastic_rates_count_the_server_cumulatively_and_a_worker_per_push() -> None:
    """The elastic server's step records carry samples merged so far, a worker's push records
    the samples of that push: both files must give the same 320 samples/s."""
    rates = {}
    for role, samples in (("server", lambda i: 320 * i), ("worker", lambda i: 320)):
        progress = Progress()
        progress.update({"event": "start", "role": role, "mode": "elastic", "total_steps": 50})
        for i in range(1, 6):
            progress.update({"event": "step", "step": i, "loss": 1.0, "samples": samples(i),
                             "wall": float(i)})  # fmt: skip
        rates[role] = progress.samples_per_s
    assert rates == {"server": 320.0, "worker": 320.0}


def test_progress_line_has_rate_slowest_and_eta() -> None:
    progress = Progress()
    progress.update({"event": "start", "role": "server", "mode": "sync", "total_steps": 100})
    for step in range(1, 11):  # 64 samples per step, one step per 0.5 s, pi4 last 7 times of 10
        last = "pi4" if step % 3 else "mini2"
        order = {"mini2": 32, "pi4": 32} if last == "pi4" else {"pi4": 32, "mini2": 32}
        line = progress.update(
            {"event": "step", "step": step, "epoch": 0, "loss": 1.0 / step, "samples": 64,
             "batch_sizes": order, "wall": 0.5 * step}
        )  # fmt: skip
    assert line is not None
    assert line.startswith("step 10/100  epoch 1  loss 0.1000  accuracy -")
    assert "128 samples/s" in line and "slowest pi4" in line and "ETA 45s" in line
    line = progress.update({"event": "eval", "step": 10, "val_accuracy": 0.9123})
    assert line is not None and "accuracy 0.9123 (step 10)" in line


def test_report_marks_drops_and_rejoins(tmp_path: Path) -> None:
    members = [["a", "b"], ["a", "b"], ["a"], ["a"], ["b", "a"], ["a", "b", "c"]]
    start = {"mode": "sync", "backend": "socket", "workers": 2, "total_steps": 6,
             "dataset": "full MNIST from the package index"}  # fmt: skip
    server = Metrics(tmp_path / "s", "s", "server", "s", "disabled", {})
    server.write("start", role="server", host="s", **start)
    for i, m in enumerate(members):
        server.write("step", step=i + 1, loss=1.0, batch_sizes=dict.fromkeys(m, 32))
    server.close()
    worker = Metrics(tmp_path / "a", "a", "worker", "a", "disabled", {})
    worker.write("start", role="worker", host="a", **start)
    for i in range(4):
        worker.write("step", step=i, loss=1.0, compute_s=0.5, wait_s=0.2, step_time_s=1.0)
    worker.close()
    runs = load_run(tmp_path)
    assert [line for line in summary_lines(runs) if line.startswith("membership")] == [
        "membership: step 3 drop b",
        "membership: step 5 rejoin b",
        "membership: step 6 join c",
    ]
    a = next(r for r in runs if r.host == "a")
    assert (round(a.compute_s, 6), round(a.send_s, 6), round(a.wait_s, 6)) == (2.0, 1.2, 0.8)
    result = subprocess.run(
        [sys.executable, "-m", "smolcluster.report", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_member_records_name_who_joined_and_left_and_why(tmp_path: Path) -> None:
    start = {"mode": "elastic", "backend": "socket", "workers": 3, "total_steps": 9,
             "dataset": "offline digits"}  # fmt: skip
    server = Metrics(tmp_path / "s", "s", "server", "s", "disabled", {})
    server.write("start", role="server", host="s", **start)
    changes = [("a", "started", 0, 1, None), ("b", "started", 0, 2, None),
               ("c", "joined", 4, 2, None), ("c", "started", 4, 3, None),
               ("b", "left", 6, 2, "silent for 30 s"), ("b", "started", 8, 3, None)]  # fmt: skip
    progress, lines = Progress(), []
    for host, change, step, workers, reason in changes:
        record = {"host": host, "change": change, "step": step, "workers": workers}
        server.write("member", **record, **({"reason": reason} if reason else {}))
        lines.append(progress.update({"event": "member", **record, **(
            {"reason": reason} if reason else {})}))  # fmt: skip
    server.close()
    assert lines == [None, None, None, "c started at step 4; 3 training",
                     "b left at step 6 (silent for 30 s); 2 training",
                     "b started at step 8; 3 training"]  # fmt: skip
    assert [line for line in summary_lines(load_run(tmp_path)) if "membership" in line] == [
        "membership: step 4 join c",
        "membership: step 6 drop b (silent for 30 s)",
        "membership: step 8 rejoin b",
    ]


def test_a_malformed_record_is_named_by_the_watcher_and_the_report(tmp_path: Path) -> None:
    (tmp_path / "mini1").mkdir()
    metrics = tmp_path / "mini1" / "mini1.jsonl"
    bad = {**EVENTS[2], "loss": "low"}
    metrics.write_text("".join(json.dumps(e) + "\n" for e in [*EVENTS[:2], bad, *EVENTS[3:]]))
    where = f"{metrics}:3: step record: loss"
    followed = _watch("--metrics", str(metrics), "--timeout", "30", "--interval", "0.1")
    assert followed.returncode == 2 and where in followed.stderr, followed.stderr
    assert followed.stdout.startswith("step 1/3")  # what came before the bad line was shown
    status = json.loads(_watch("--status", "--metrics", str(metrics)).stdout)
    assert status["step"] == 1 and status["line"].startswith(f"error: {where}")
    report = subprocess.run(
        [sys.executable, "-m", "smolcluster.report", "--no-plot", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert report.returncode == 2 and where in report.stderr, report.stderr
