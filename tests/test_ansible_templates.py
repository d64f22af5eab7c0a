"""Job files for launchers that cannot run here (launchd on macOS, systemd units):
render the trainer role's real templates with ansible and check what they say."""

from __future__ import annotations

import plistlib
import sys
from pathlib import Path

import yaml

from tests.ansible_helpers import REPO, playbook, show

TEMPLATES = REPO / "roles" / "trainer" / "templates"


def _render(tmp_path: Path, template: str, dest: str, **facts: object) -> Path:
    vars_ = {
        "smolcluster_root": "/Users/smol/smolcluster",
        "smolcluster_run_dir": "/Users/smol/smolcluster/run",
        "trainer__label": "org.smolcluster.mini2",
        "trainer__is_server": False,
        "trainer_systemd_scope": "user",
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


def test_launchd_plist_is_a_finite_launch_agent(tmp_path: Path) -> None:
    plist = plistlib.loads(_render(tmp_path, "launchd.plist.j2", "agent.plist").read_bytes())
    assert plist["Label"] == "org.smolcluster.mini2"
    assert plist["ProgramArguments"] == ["/bin/sh", "/Users/smol/smolcluster/bin/job.sh"]
    assert plist["WorkingDirectory"] == "/Users/smol/smolcluster"
    assert plist["StandardOutPath"] == "/Users/smol/smolcluster/run/mini2.launchd.log"
    assert plist["StandardErrorPath"] == plist["StandardOutPath"]
    assert "KeepAlive" not in plist  # a finite run must not be restarted
    assert plist["RunAtLoad"] is False


def test_systemd_unit_runs_the_job_once(tmp_path: Path) -> None:
    unit = _render(tmp_path, "smolcluster.service.j2", "unit.service").read_text()
    lines = {line.strip() for line in unit.splitlines()}
    assert "ExecStart=/bin/sh /Users/smol/smolcluster/bin/job.sh" in lines
    assert "Restart=no" in lines
    assert "WantedBy=default.target" in lines
    assert not any(line.startswith("User=") for line in lines)  # user scope
