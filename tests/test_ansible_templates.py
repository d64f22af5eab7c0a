"""Job files for launchers that cannot run here (launchd on macOS, systemd units):
render the trainer role's real templates with ansible and check what they say."""

from __future__ import annotations

import plistlib
import subprocess
import sys
from pathlib import Path

import yaml

from smolcluster.harness import free_port
from tests.ansible_helpers import REPO, playbook, show

TEMPLATES = REPO / "roles" / "trainer" / "templates"


def _render(tmp_path: Path, template: str, dest: str, **facts: object) -> Path:
    vars_ = {
        "smolcluster_root": "/Users/smol/smolcluster",
        "smolcluster_run_dir": "/Users/smol/smolcluster/run",
        "smolcluster_launchd_label": "org.smolcluster.mini2",
        "trainer_launchd_user": "smol",
        "trainer_launchd_home": "/Users/smol",
        "trainer__is_server": False,
        "smolcluster_systemd_scope": "user",
        **facts,
    }
    play = [{
        "name": "Render one trainer template",
        "hosts": "all",
        "connection": "local",
        "gather_facts": False,
        "vars": vars_,
        "tasks": [{
            "name": "Render",
            "ansible.builtin.template": {"src": str(TEMPLATES / template),
                                         "dest": str(tmp_path / dest)},
        }],
    }]  # fmt: skip
    (tmp_path / "render.yml").write_text(yaml.safe_dump(play))
    result = playbook(
        tmp_path, "render.yml", "-i", "mini2,",
        "-e", f"ansible_python_interpreter={sys.executable}",
    )  # fmt: skip
    assert result.returncode == 0, show(result)
    return tmp_path / dest


def test_launchd_plist_is_a_finite_launch_daemon_run_as_the_user(tmp_path: Path) -> None:
    plist = plistlib.loads(_render(tmp_path, "launchd.plist.j2", "daemon.plist").read_bytes())
    # The keys launchd needs for a system-domain daemon that runs as the login user.
    assert plist["Label"] == "org.smolcluster.mini2"
    assert plist["UserName"] == "smol"
    assert plist["ProgramArguments"] == ["/bin/sh", "/Users/smol/smolcluster/bin/job.sh"]
    assert plist["WorkingDirectory"] == "/Users/smol/smolcluster"
    assert plist["EnvironmentVariables"]["HOME"] == "/Users/smol"
    assert plist["StandardOutPath"] == "/Users/smol/smolcluster/run/mini2.launchd.log"
    assert plist["StandardErrorPath"] == plist["StandardOutPath"]
    assert "KeepAlive" not in plist  # a finite run must not be restarted
    assert plist["RunAtLoad"] is False  # nor started at boot; train.yml kickstarts it
    assert "LimitLoadToSessionType" not in plist  # a daemon, not an Aqua agent


def test_forwarding_plist_runs_sysctl_at_boot(tmp_path: Path) -> None:
    src = REPO / "roles" / "network" / "templates" / "forwarding.plist.j2"
    dest = tmp_path / "fwd.plist"
    _render(
        tmp_path, str(src), dest.name, network_darwin_forwarding_label="org.smolcluster.forwarding"
    )
    plist = plistlib.loads(dest.read_bytes())
    assert plist == {
        "Label": "org.smolcluster.forwarding",
        "ProgramArguments": ["/usr/sbin/sysctl", "-w", "net.inet.ip.forwarding=1"],
        "RunAtLoad": True,
    }


def test_systemd_unit_runs_the_job_once(tmp_path: Path) -> None:
    unit = _render(tmp_path, "smolcluster.service.j2", "unit.service").read_text()
    lines = {line.strip() for line in unit.splitlines()}
    assert "ExecStart=/bin/sh /Users/smol/smolcluster/bin/job.sh" in lines
    assert "Restart=no" in lines
    assert "WantedBy=default.target" in lines
    assert not any(line.startswith("User=") for line in lines)  # user scope


def test_job_script_ends_at_once_with_the_probe_line_when_the_server_is_unreachable(
    tmp_path: Path,
) -> None:
    """The probe's one call site: the real job.sh, run here, against a closed loopback port."""
    port = free_port()
    root = tmp_path / "root"
    job = _render(
        tmp_path, "job.sh.j2", "job.sh",
        smolcluster_root=str(root), smolcluster_run_dir=str(root / "run"),
        smolcluster_venv=str(Path(sys.executable).parent.parent),
        smolcluster_config_dir=str(root / "config"), smolcluster_port=port,
        smolcluster_bind_address="127.0.0.1", trainer__comm_backend="socket",
        trainer__workers=["mini2"], trainer__cluster_config={"host_ip": {"mini2": "127.0.0.1"}},
        trainer_reach_check=True, trainer_reach_wait_s=1,
    )  # fmt: skip
    root.mkdir()
    done = subprocess.run(["/bin/sh", str(job)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 4
    assert (root / "run" / "mini2.exit").read_text().strip() == "4"
    assert not (root / "run" / "mini2.pid").exists()  # the trainer never started
    log = (root / "run" / "mini2.log").read_text().splitlines()
    assert len(log) == 1
    assert log[0].startswith(f"smolcluster reach: mini2 cannot connect to 127.0.0.1:{port}: ")
