"""The controller-side watcher and report: real processes writing a real metrics file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from smolcluster.report import load_run, summary_lines
from smolcluster.watch import proxy_command, ssh_settings

EVENTS = [
    {"event": "start", "role": "server", "host": "mini1", "total_steps": 3, "time": 0},
    {"event": "step", "step": 1, "epoch": 0, "loss": 2.3, "samples_per_s": 10.0},
    {"event": "step", "step": 2, "epoch": 0, "loss": 1.7, "samples_per_s": 10.0},
    {"event": "eval", "step": 2, "epoch": 0, "val_loss": 1.6, "val_accuracy": 0.61, "wall": 1.0},
    {"event": "step", "step": 3, "epoch": 0, "loss": 1.2, "samples_per_s": 10.0},
    {"event": "summary", "role": "server", "host": "mini1", "steps": 3, "final_accuracy": 0.7,
     "final_val_loss": 1.1, "wall": 2.0, "samples": 96, "samples_per_s": 48.0,
     "bytes_sent": 1000, "bytes_recv": 900},
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
    assert lines[0].startswith("step 1/3 epoch 0 loss 2.3000")
    assert "accuracy 0.6100" in lines[3]
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
