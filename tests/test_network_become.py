"""The network role asks for root exactly where it writes (F1 of the real-hardware review).

A normal login user (smol) runs the playbooks; only the network role's writes (/var/lib state,
/etc persistence, sysctl, NetworkManager, ip/networksetup changes, the boot unit) need sudo.
The static test reads every task file of the role; the playbook test runs site.yml's network
play in check mode for a host with nothing to configure (the MacBook), which must skip the role
entirely and so never ask for a password.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ansible_helpers import REPO, playbook, recap, show

ROLE = REPO / "roles" / "network"
# Modules that write root-owned files or change the network.
ROOT_MODULES = {
    "ansible.builtin.file",
    "ansible.builtin.copy",
    "ansible.builtin.template",
    "ansible.builtin.lineinfile",
    "ansible.builtin.systemd_service",
    "ansible.posix.sysctl",
    "community.general.nmcli",
}
KEYWORDS = {
    "name", "when", "become", "become_user", "register", "loop", "loop_control", "notify",
    "changed_when", "failed_when", "check_mode", "tags", "vars", "listen", "until", "retries",
    "delay", "delegate_to", "run_once", "environment", "args", "ignore_errors", "no_log",
    "block", "rescue", "always",
}  # fmt: skip


def _tasks(items: list[dict], become: bool = False) -> Iterator[tuple[dict, bool]]:
    """Every task with its effective become (a block's become reaches its tasks)."""
    for task in items or []:
        mine = bool(task.get("become", become))
        if "block" in task:
            for part in ("block", "rescue", "always"):
                yield from _tasks(task.get(part, []), mine)
        else:
            yield task, mine


def _module(task: dict) -> str:
    return next(k for k in task if k not in KEYWORDS)


def _needs_root(task: dict) -> bool:
    module = _module(task)
    if module in ROOT_MODULES:
        return True
    # A command that changes something: reads are marked changed_when: false.
    return module == "ansible.builtin.command" and task.get("changed_when") is not False


def _role_tasks() -> list[tuple[str, dict, bool]]:
    found = []
    for path in sorted([*ROLE.glob("tasks/*.yml"), ROLE / "handlers" / "main.yml"]):
        data: Any = yaml.safe_load(path.read_text())
        for task, become in _tasks(data):
            found.append((f"{path.relative_to(ROLE)}: {task.get('name')}", task, become))
    return found


def test_every_root_task_becomes_and_no_read_does() -> None:
    tasks = _role_tasks()
    assert len(tasks) > 40  # the walk found the role's tasks
    missing = [name for name, task, become in tasks if _needs_root(task) and not become]
    assert missing == [], f"tasks that need root but do not become: {missing}"
    needless = [name for name, task, become in tasks if become and not _needs_root(task)]
    assert needless == [], f"tasks that become without needing root: {needless}"
    # Imports carry no become of their own, so escalation is visible where it happens.
    imports = [
        name
        for name, task, _ in tasks
        if _module(task).endswith(("import_tasks", "include_tasks")) and "become" in task
    ]
    assert imports == []


@pytest.mark.parametrize("playbook_name", ["site.yml", "teardown.yml"])
def test_playbooks_do_not_escalate_globally(playbook_name: str) -> None:
    plays = yaml.safe_load((REPO / playbook_name).read_text())
    assert all("become" not in play for play in plays), playbook_name


def test_host_without_links_skips_the_role_and_needs_no_sudo(tmp_path: Path) -> None:
    """The MacBook: cluster_manage_network is true (group_vars/all.yml) but it has no links,
    routes or forwarding. Any become would fail here (become_exe does not exist)."""
    # In group server only because trainer/main.yml's always-tagged first task reads it.
    inventory = {
        "server": {
            "hosts": {
                "macbook": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                    "ansible_become_exe": str(tmp_path / "no-sudo-here"),
                    "cluster_interfaces": [],
                    "smolcluster_root": str(tmp_path / "macbook"),
                }
            }
        }
    }
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    for name, extra in (("site.yml", []), ("teardown.yml", ["-e", "restore_network=true"])):
        result = playbook(
            REPO, name, "-i", str(tmp_path / "inventory.yml"), "--tags", "network", "--check",
            *extra,
        )  # fmt: skip
        assert result.returncode == 0, show(result)
        assert recap(result.stdout)["macbook"]["changed"] == 0, show(result)
        assert "state directory" not in result.stdout, show(result)


def test_linux_path_reads_without_sudo_and_asks_for_it_at_the_first_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The role's Linux path in check mode on this machine, with a sudo that cannot work: the
    reads (default routes, forwarding) pass unescalated, the first write (the state directory)
    is where become is tried. lo's own 127.0.0.1/8 is the 'link', so nothing could be planned;
    every path the role would write is under tmp_path."""
    monkeypatch.setenv("ANSIBLE_BECOME_ALLOW_SAME_USER", "True")  # we are root here
    etc = tmp_path / "etc"
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        "ansible_become_exe": str(tmp_path / "no-sudo-here"),
        "cluster_interfaces": [
            {"link": "fabric", "address": "127.0.0.1", "prefix": 8, "linux_device": "lo"}
        ],
        "network_linux_backend": "iproute2",
        "network_state_dir": str(tmp_path / "state"),
        "network_sysctl_file": str(etc / "sysctl.d" / "90-smolcluster.conf"),
        "network_linux_persist_dir": str(etc / "smolcluster-network"),
        "network_systemd_unit_dir": str(etc / "systemd" / "system"),
        "network_systemd_enable": False,
    }
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump({"all": {"hosts": {"mini2": host}}}))
    (tmp_path / "play.yml").write_text(
        yaml.safe_dump([{"hosts": "all", "gather_facts": True, "roles": ["network"]}])
    )
    result = playbook(REPO, str(tmp_path / "play.yml"), "-i", str(tmp_path / "inventory.yml"),
                      "--check")  # fmt: skip
    assert result.returncode != 0, show(result)
    ran = result.stdout.split("TASK [network : Create the state directory]")
    assert len(ran) == 2, show(result)
    assert "TASK [network : Read IPv4 forwarding before any change]" in ran[0]
    assert "fatal" not in ran[0] and "no-sudo-here" in ran[1], show(result)
    assert not (tmp_path / "state").exists() and not etc.exists()
