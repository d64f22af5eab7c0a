"""teardown.yml also removes what doctor.yml's one-shot jobs leave behind, on the local default.

Real ansible-playbook runs in a scratch checkout (tmux backend, this test's own tmux socket):
the trainer role's doctor-job-start.yml starts mini1's doctor job, whose probe never ends;
pi4's probe outlived its session (a process of its own, no tmux) and left its files. After
`teardown.yml --check` all of it is still there; after `teardown.yml` none of it is.
The probe is a stand-in at the venv's `smolcluster` path that sleeps: no site.yml needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.ansible_helpers import playbook, remove_tmux_server, scratch_checkout, show

pytestmark = pytest.mark.slow

# A doctor probe that does not end (a wedged dial); its command line is the real one's.
WEDGED = f"#!{sys.executable}\nimport time\ntime.sleep(600)\n"
PROBE = "{{ smolcluster_venv }}/bin/smolcluster"
LEAVE_A_DOCTOR_JOB = [
    {
        "name": "Start mini1's doctor job and leave it running",
        "hosts": "mini1",
        "gather_facts": True,
        "gather_subset": ["min"],
        "tasks": [
            {
                "name": "Start the doctor job",
                "ansible.builtin.include_role": {
                    "name": "trainer",
                    "tasks_from": "doctor-job-start",
                },
                "vars": {"trainer_doctor_argv": [PROBE, "doctor", "dial"]},
            }
        ],
    }
]


def _stand_in_venv(root: Path) -> Path:
    exe = root / "venv" / "bin" / "smolcluster"
    exe.parent.mkdir(parents=True)
    exe.write_text(WEDGED)
    exe.chmod(0o755)
    return exe


def _has_session(socket_name: str, name: str) -> bool:
    cmd = ["tmux", "-L", socket_name, "has-session", "-t", f"={name}"]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def _doctor_files(run: Path, host: str) -> list[str]:
    return sorted(p.name for p in run.glob(f"{host}.doctor.*"))


def _gone(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc.poll() is not None


def test_teardown_stops_and_removes_doctor_jobs(tmp_path: Path) -> None:
    work = scratch_checkout(tmp_path)
    socket_name = f"smolcluster-test-doctor-{os.getpid()}"
    extra = ["-e", f"smolcluster_tmux_socket={socket_name}"]
    limit = [*extra, "--limit", "mini1,pi4"]  # the two hosts with something left (time)
    local = work / ".local-cluster"
    mini1_run, pi4_run = local / "mini1" / "run", local / "pi4" / "run"
    _stand_in_venv(local / "mini1")
    pi4_probe = _stand_in_venv(local / "pi4")
    (work / "leave.yml").write_text(yaml.safe_dump(LEAVE_A_DOCTOR_JOB, sort_keys=False))
    orphan = None
    try:
        started = playbook(work, "leave.yml", *extra, timeout=300)
        assert started.returncode == 0, show(started)
        assert _has_session(socket_name, "smolcluster-doctor-mini1")
        # pi4: a probe whose session is gone, its output and half-written exit status left.
        pi4_run.mkdir(parents=True)
        for name in ("pi4.doctor.log", "pi4.doctor.exit.tmp", "pi4.doctor.launchd.log"):
            (pi4_run / name).write_text("left behind\n")
        orphan = subprocess.Popen(
            [str(pi4_probe), "doctor", "dial"], start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # Reaped as soon as it ends: a zombie would still answer teardown's kill -0.
        threading.Thread(target=orphan.wait, daemon=True).start()
        time.sleep(1)  # the probes' command lines are in place
        assert _doctor_files(mini1_run, "mini1") == ["mini1.doctor.log"]

        checked = playbook(work, "teardown.yml", "--check", *limit, timeout=300)
        assert checked.returncode == 0, show(checked)
        assert _has_session(socket_name, "smolcluster-doctor-mini1"), "--check stopped a job"
        assert orphan.poll() is None, "--check stopped a process"
        assert _doctor_files(mini1_run, "mini1") == ["mini1.doctor.log"]
        assert len(_doctor_files(pi4_run, "pi4")) == 3

        down = playbook(work, "teardown.yml", *limit, timeout=300)
        assert down.returncode == 0, show(down)
        assert not _has_session(socket_name, "smolcluster-doctor-mini1"), show(down)
        assert _gone(orphan), show(down)
        assert orphan.returncode == -signal.SIGTERM  # stopped by teardown, by its pid
        assert _doctor_files(mini1_run, "mini1") == [], show(down)
        assert _doctor_files(pi4_run, "pi4") == [], show(down)
    finally:
        remove_tmux_server(socket_name)
        if orphan is not None and orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_the_doctor_job_names_its_missing_input(tmp_path: Path) -> None:
    """doctor-job-start.yml without trainer_doctor_argv stops at its argument_specs entry point,
    naming the variable, before anything is started."""
    work = scratch_checkout(tmp_path)
    plays = yaml.safe_load(yaml.safe_dump(LEAVE_A_DOCTOR_JOB))
    del plays[0]["tasks"][0]["vars"]
    (work / "no-argv.yml").write_text(yaml.safe_dump(plays, sort_keys=False))
    result = playbook(work, "no-argv.yml", "-e", "smolcluster_tmux_socket=unused", timeout=300)
    assert result.returncode != 0, show(result)
    assert (
        "ERROR: role trainer: missing required arguments: trainer_doctor_argv" in result.stdout
    ), show(result)
    assert not (work / ".local-cluster" / "mini1" / "run").exists()


# systemctl as it answers for a doctor unit still running: `show` says active, the rest succeeds.
# This machine runs no systemd, so the systemd path meets this stand-in (it records each call).
SYSTEMCTL = """#!/bin/sh
echo "$*" >> "{calls}"
case " $* " in *" show "*) echo active ;; esac
"""

LIMIT = ["-e", "smolcluster_tmux_socket=unused", "--limit", "mini1"]


def _with_stand_in_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A scratch checkout and the file SYSTEMCTL, first on PATH, records its calls in."""
    (tmp_path / "work").mkdir()
    work = scratch_checkout(tmp_path / "work")
    calls, stub = tmp_path / "systemctl.calls", tmp_path / "bin" / "systemctl"
    stub.parent.mkdir()
    stub.write_text(SYSTEMCTL.format(calls=calls))
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    return work, calls


def test_teardown_stops_a_doctor_unit_systemd_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, calls = _with_stand_in_systemctl(tmp_path, monkeypatch)

    checked = playbook(work, "teardown.yml", "--check", *LIMIT, timeout=300)
    assert checked.returncode == 0, show(checked)
    ran = calls.read_text().splitlines()
    assert "--user show --property=ActiveState --value smolcluster-doctor-mini1" in ran, ran
    assert not [c for c in ran if " stop " in f" {c} "], ran  # --check stops nothing

    down = playbook(work, "teardown.yml", *LIMIT, timeout=300)
    assert down.returncode == 0, show(down)
    assert "--user stop smolcluster-doctor-mini1" in calls.read_text().splitlines(), show(down)


def test_one_setting_puts_teardown_in_the_trainers_systemd_scope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """smolcluster_systemd_scope (group_vars/all.yml) is the scope the trainer role starts in
    and the one teardown looks in: system scope asks systemctl without --user."""
    work, calls = _with_stand_in_systemctl(tmp_path, monkeypatch)
    system = ["-e", "smolcluster_systemd_scope=system"]
    checked = playbook(work, "teardown.yml", "--check", *system, *LIMIT, timeout=300)
    assert checked.returncode == 0, show(checked)
    ran = calls.read_text().splitlines()
    assert "show --property=ActiveState --value smolcluster-doctor-mini1" in ran, ran
    assert not [c for c in ran if "--user" in c.split()], ran
