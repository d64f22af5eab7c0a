"""The nmcli backend's profile (F12): what community.general.nmcli is asked for.

NetworkManager is not on this machine, so the module cannot run here; the lab's Pi containers
run it for real (docs/lab.md). This pins the arguments the review asked for."""

from __future__ import annotations

import yaml

from tests.ansible_helpers import REPO

TASKS = REPO / "roles" / "network" / "tasks"


def test_profile_is_static_never_default_with_priority_and_profile_routes() -> None:
    (task,) = yaml.safe_load((TASKS / "Linux-nmcli.yml").read_text())
    args = task["community.general.nmcli"]
    assert task["become"] is True
    assert args["method4"] == "manual" and args["never_default4"] is True
    assert args["ip4"] == ["{{ item.address }}/{{ item.prefix }}"]
    assert "network_nmcli_routes" in args["routes4"]  # routes live in the profile
    assert "network_nmcli_priority" in args["autoconnect_priority"]
    assert args["autoconnect"] is True and args["state"] == "present"


def test_restore_deletes_ours_and_reactivates_the_earlier_profile() -> None:
    (_, nm_block, *_rest) = yaml.safe_load((TASKS / "restore-Linux.yml").read_text())
    assert nm_block["become"] is True
    remove, reactivate = nm_block["block"]
    assert remove["community.general.nmcli"]["state"] == "absent"
    argv = reactivate["ansible.builtin.command"]["argv"]
    assert argv[:2] == ["nmcli", "--wait"] and argv[3:6] == ["connection", "up", "uuid"]
    assert "nmcli_active_before" in reactivate["loop"]
