"""The Darwin task files of every role, end to end against a fake Mac (tests/fake_macos.py).

Real ansible-playbook runs drive preflight's Darwin checks, the network role's macOS path,
the trainer's LaunchDaemon setup and start, teardown's stop and purge, and the network
restore, on two local hosts whose facts say Darwin and whose PATH starts with the stubs. Set
up twice (the second run must change nothing), start, tear down, then the stubs' state must
be what it was before. Root-owned paths (/Library/LaunchDaemons, /var/lib) are redirected
into the test's directory; the stubs only read and write their state file.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import fake_macos
from tests.ansible_helpers import BIN, REPO, recap, show

# A module that reports Darwin facts the way setup does; everything else stays real.
FAKE_FACTS = """#!/usr/bin/python
from ansible.module_utils.basic import AnsibleModule

module = AnsibleModule(argument_spec={}, supports_check_mode=True)
module.exit_json(changed=False, ansible_facts={
    "ansible_system": "Darwin", "ansible_os_family": "Darwin",
    "ansible_distribution": "MacOSX", "ansible_distribution_version": "15.5",
})
"""

PRETEND = {
    "name": "Pretend to be a Mac",
    "hosts": "all",
    "gather_facts": False,
    "tasks": [
        {"name": "Gather the real facts", "ansible.builtin.setup": {"gather_subset": ["min"]}},
        {"name": "Say Darwin", "fake_darwin_facts": {}},
    ],
}


def _play(name: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "hosts": "all", "gather_facts": False, "tasks": tasks}


def _role(name: str, tasks_from: str = "main.yml", when: str | None = None) -> dict[str, Any]:
    task: dict[str, Any] = {
        "name": f"{name} {tasks_from}",
        "ansible.builtin.include_role": {"name": name, "tasks_from": tasks_from},
    }
    if when:
        task["when"] = when
    return task


DOCTOR_JOB_START = {
    **_role("trainer", "doctor-job-start"),
    "vars": {"trainer_doctor_argv": ["/bin/sleep", "600"]},
}
PLAYBOOKS = {
    "setup.yml": [
        PRETEND,
        _play("Preflight", [_role("preflight")]),
        _play("Network", [_role("network")]),
        _play("Trainer jobs", [_role("trainer")]),
    ],
    # Start (kickstart), then what teardown.yml runs: stop and purge, restore the network.
    "start-teardown.yml": [
        PRETEND,
        _play("Start", [_role("trainer", "facts.yml"), _role("trainer", "start-launchd.yml")]),
        _play("Stop and purge", [_role("teardown")]),
        _play("Restore the network", [_role("network", "restore.yml")]),
    ],
    # doctor.yml's one-shot LaunchDaemon, started and not waited for (an interrupted doctor run).
    "doctor-left.yml": [
        PRETEND,
        _play("Start a doctor job", [DOCTOR_JOB_START]),
    ],
    "stop.yml": [PRETEND, _play("Stop", [_role("teardown")])],
}


@pytest.fixture
def mac(tmp_path: Path) -> dict[str, Path]:
    bin_dir, state = tmp_path / "bin", tmp_path / "fake-mac"
    fake_macos.install(bin_dir, state, fake_macos.mac_mini(admins=[_user()]))
    daemons = tmp_path / "LaunchDaemons"
    daemons.mkdir()
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        # The trainer role checks its configs with the host venv's smolcluster: this one's.
        "smolcluster_venv": sys.prefix,
        "smolcluster_launchd_plist": f"{daemons}/{{{{ smolcluster_launchd_label }}}}.plist",
        "smolcluster_doctor_launchd_plist": (
            f"{daemons}/{{{{ smolcluster_doctor_launchd_label }}}}.plist"
        ),
        # teardown asks tmux too: this test's own server, never the user's (or another run's).
        "smolcluster_tmux_socket": f"smolcluster-test-mac-{os.getpid()}",
        "trainer_launchd_plist_group": "root",
        "trainer_wandb_mode": "disabled",
        "preflight_socketfilterfw": str(bin_dir / "socketfilterfw"),
        "preflight_check_port": False,
        "smolcluster_controller_dir": str(tmp_path / "controller"),
    }
    inventory = {
        "all": {
            "children": {
                "server": {
                    "hosts": {
                        "mini1": {
                            **host,
                            "smolcluster_root": str(tmp_path / "mini1"),
                            "cluster_forwarding": True,
                            "cluster_interfaces": [
                                {
                                    "link": "fabric",
                                    "address": "10.10.0.1",
                                    "prefix": 24,
                                    "macos_service": "Thunderbolt Bridge",
                                },
                                {
                                    "link": "edge50",
                                    "address": "192.168.50.1",
                                    "prefix": 24,
                                    "macos_hardware_port": "USB 10/100/1000 LAN",
                                },
                            ],
                            "cluster_routes": [{"to": "192.168.51.0/24", "via": "10.10.0.3"}],
                            "network_verify": False,
                            "network_state_dir": str(tmp_path / "network-state"),
                            "network_darwin_forwarding_plist": f"{daemons}/fwd.plist",
                            "network_darwin_plist_group": "root",
                        }
                    }
                },
                # The worker the layout needs; the runs are limited to mini1 (time).
                "workers": {
                    "hosts": {
                        "macbook": {
                            **host,
                            "smolcluster_root": str(tmp_path / "macbook"),
                            "cluster_interfaces": [],
                            "cluster_dial_address": "10.10.0.1",
                        }
                    }
                },
            }
        }
    }
    # Both in group macs, so group_vars/macs.yml picks the backend (launchd on Darwin).
    inventory["all"]["children"]["macs"] = {"hosts": {"mini1": None, "macbook": None}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "group_vars").symlink_to(REPO / "group_vars")  # the playbooks' own defaults
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "fake_darwin_facts.py").write_text(FAKE_FACTS)
    for name, plays in PLAYBOOKS.items():
        (tmp_path / name).write_text(yaml.safe_dump(plays, sort_keys=False))
    return {"dir": tmp_path, "bin": bin_dir, "state": state, "daemons": daemons}


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _run(mac: dict[str, Path], name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
        "ANSIBLE_FILTER_PLUGINS": str(REPO / "ansible" / "plugins" / "filter"),
        "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml",
        # We run as root here; still go through (the fake) sudo, as the login user on a Mac must.
        "ANSIBLE_BECOME_ALLOW_SAME_USER": "1",
        "ANSIBLE_PIPELINING": "1",
        # The stubs first; sudo among them, so become works (and is recorded) as on a Mac.
        "PATH": f"{mac['bin']}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("ANSIBLE_CONFIG", None)
    # Not the typo and layout checks (tests/test_ansible_inventory.py): they are no Darwin path.
    skip = "preflight-vars,preflight-inventory"
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "inventory.yml", "--skip-tags", skip, name, *args],
        cwd=mac["dir"], env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def _writes(state_dir: Path) -> list[list[str]]:
    readers = {"-listallnetworkservices", "-listallhardwareports", "-listnetworkserviceorder",
               "-getinfo", "-getadditionalroutes", "print", "-n"}  # fmt: skip
    return [
        [c["tool"], *c["argv"]]
        for c in fake_macos.calls(state_dir)
        if c["tool"] in ("networksetup", "launchctl", "sysctl") and c["argv"][0] not in readers
    ]


def _contract() -> list[list[str]]:
    text = (REPO / "docs" / "macos-contract.md").read_text()
    block = text.split("<!-- macos-contract -->\n```contract\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def _in_contract(argv: list[str], contract: list[list[str]]) -> bool:
    def match(words: list[str], pattern: list[str]) -> bool:
        if pattern and pattern[-1].startswith("<") and pattern[-1].endswith(">..."):
            head = pattern[:-1]
            return len(words) >= len(head) and match(words[: len(head)], head)
        return len(words) == len(pattern) and all(
            p == w or (p.startswith("<") and p.endswith(">")) or
            (p.startswith("system/<") and w.startswith("system/"))
            for w, p in zip(words, pattern, strict=True)
        )  # fmt: skip

    return any(match(argv, pattern) for pattern in contract)


def test_darwin_paths_set_up_twice_start_and_tear_down(mac: dict[str, Path]) -> None:
    before = fake_macos.read_state(mac["state"])

    first = _run(mac, "setup.yml", "--limit", "mini1")
    assert first.returncode == 0, show(first)
    after = fake_macos.read_state(mac["state"])
    svc = {s["name"]: s for s in after["services"]}
    assert (svc["Thunderbolt Bridge"]["method"], svc["Thunderbolt Bridge"]["ip"]) == (
        "manual", "10.10.0.1",
    )  # fmt: skip
    assert svc["Thunderbolt Bridge"]["routes"] == [["192.168.51.0", "255.255.255.0", "10.10.0.3"]]
    assert svc["USB 10/100/1000 LAN"]["ip"] == "192.168.50.1"  # found by its hardware port
    assert after["sysctl"]["net.inet.ip.forwarding"] == "1"
    jobs = after["launchd"]
    assert set(jobs) == {"org.smolcluster.forwarding", "org.smolcluster.mini1"}
    assert jobs["org.smolcluster.forwarding"]["runs"] == 1  # RunAtLoad: it ran sysctl -w
    assert jobs["org.smolcluster.mini1"]["runs"] == 0  # not run at load
    assert jobs["org.smolcluster.mini1"]["plist"]["UserName"] == _user()
    # Every change went through sudo (the stubs refuse writers without it).
    writes = _writes(mac["state"])
    assert ["launchctl", "bootstrap", "system", str(mac["daemons"] / "fwd.plist")] in writes
    assert all(c["root"] for c in fake_macos.calls(mac["state"]) if c["argv"][:1] == ["bootstrap"])
    assert "WARNING mini1: macOS 15.5 sleeps after 1 idle minutes" in first.stdout

    job = (mac["dir"] / "mini1" / "bin" / "job.sh").read_text()
    (caffeinate,) = [ln.split(">")[0].split() for ln in job.splitlines() if "caffeinate -" in ln]
    assert _in_contract([Path(caffeinate[0]).name, *caffeinate[1:-1], "<pid>"], _contract())

    calls_before = len(fake_macos.calls(mac["state"]))
    second = _run(mac, "setup.yml", "--limit", "mini1")
    assert second.returncode == 0, show(second)
    assert {h: r["changed"] for h, r in recap(second.stdout).items()} == {"mini1": 0}
    assert _writes(mac["state"])[len(writes) :] == [], "a second run changed the Mac"
    assert len(fake_macos.calls(mac["state"])) > calls_before  # it did look again

    down = _run(mac, "start-teardown.yml", "--limit", "mini1", "-e", "purge=true")
    assert down.returncode == 0, show(down)
    started = [c["argv"] for c in fake_macos.calls(mac["state"]) if c["argv"][:1] == ["kickstart"]]
    assert started == [["kickstart", "system/org.smolcluster.mini1"]]
    bootouts = [c for c in fake_macos.calls(mac["state"]) if c["argv"][:1] == ["bootout"]]
    assert len(bootouts) == 2 and all(c["root"] for c in bootouts)  # the job, forwarding
    final = fake_macos.read_state(mac["state"])
    assert final["launchd"] == {}
    assert final["services"] == before["services"]
    assert final["sysctl"] == before["sysctl"]
    assert list(mac["daemons"].iterdir()) == []
    assert not (mac["dir"] / "network-state").exists()
    # Every macOS command the roles ran is one docs/macos-contract.md lists.
    contract = _contract()
    ran = [[c["tool"], *c["argv"]] for c in fake_macos.calls(mac["state"]) if c["tool"] != "sudo"]
    assert [argv for argv in ran if not _in_contract(argv, contract)] == []
    assert {argv[0] for argv in ran} >= {
        "networksetup",
        "launchctl",
        "sysctl",
        "socketfilterfw",
        "xcode-select",
        "sw_vers",
        "pmset",
        "dseditgroup",
    }


def test_teardown_boots_out_a_doctor_daemon_left_behind(mac: dict[str, Path]) -> None:
    """A doctor run that ended before doctor-job-wait.yml left its LaunchDaemon loaded, its
    plist and its files: teardown --check leaves them, teardown boots it out (with sudo) and
    removes them."""
    label = "org.smolcluster.doctor.mini1"
    plist, run = mac["daemons"] / f"{label}.plist", mac["dir"] / "mini1" / "run"
    left = _run(mac, "doctor-left.yml", "--limit", "mini1")
    assert left.returncode == 0, show(left)
    assert set(fake_macos.read_state(mac["state"])["launchd"]) == {label}
    assert plist.exists()
    files = ["mini1.doctor.exit.tmp", "mini1.doctor.launchd.log", "mini1.doctor.log"]
    for name in files:  # what the daemon's command line and its plist write
        (run / name).write_text("left behind\n")
    start_calls = len(fake_macos.calls(mac["state"]))

    def launchctl_since_start() -> list[dict[str, Any]]:
        return [c for c in fake_macos.calls(mac["state"])[start_calls:] if c["tool"] == "launchctl"]

    checked = _run(mac, "stop.yml", "--limit", "mini1", "--check")
    assert checked.returncode == 0, show(checked)
    assert set(fake_macos.read_state(mac["state"])["launchd"]) == {label}
    assert plist.exists() and sorted(p.name for p in run.iterdir()) == files
    assert [c["argv"][0] for c in launchctl_since_start()] == ["print", "print"]  # read only

    down = _run(mac, "stop.yml", "--limit", "mini1")
    assert down.returncode == 0, show(down)
    bootouts = [c for c in launchctl_since_start() if c["argv"][:1] == ["bootout"]]
    assert [(c["argv"], c["root"]) for c in bootouts] == [(["bootout", f"system/{label}"], True)]
    assert fake_macos.read_state(mac["state"])["launchd"] == {}
    assert list(mac["daemons"].iterdir()) == []
    assert list(run.iterdir()) == []
    contract = _contract()
    ran = [[c["tool"], *c["argv"]] for c in fake_macos.calls(mac["state"]) if c["tool"] != "sudo"]
    assert [argv for argv in ran if not _in_contract(argv, contract)] == []


def test_a_mistyped_service_fails_before_any_change(mac: dict[str, Path]) -> None:
    inv = mac["dir"] / "inventory.yml"
    data = yaml.safe_load(inv.read_text())
    mini1 = data["all"]["children"]["server"]["hosts"]["mini1"]
    mini1["cluster_interfaces"][1] = {"link": "edge50", "address": "192.168.50.1", "prefix": 24,
                                      "macos_service": "USB 10/100 LAN"}  # fmt: skip
    inv.write_text(yaml.safe_dump(data))
    (mac["dir"] / "net.yml").write_text(
        yaml.safe_dump([PRETEND, _play("Network", [_role("network")])], sort_keys=False)
    )
    result = _run(mac, "net.yml", "--limit", "mini1")
    assert result.returncode == 2, show(result)
    assert (
        "network role: mini1: edge50: macos_service 'USB 10/100 LAN' not found; this Mac has "
        "services: Ethernet, Wi-Fi, USB 10/100/1000 LAN, Thunderbolt Bridge" in result.stdout
    ), show(result)
    assert _writes(mac["state"]) == []
    assert not (mac["dir"] / "network-state").exists()


def test_preflight_says_what_a_fresh_mac_lacks(mac: dict[str, Path]) -> None:
    state = fake_macos.read_state(mac["state"])
    state.update(clt=False)
    (mac["state"] / "state.json").write_text(json.dumps(state))
    (mac["dir"] / "pre.yml").write_text(
        yaml.safe_dump([PRETEND, _play("Preflight", [_role("preflight")])], sort_keys=False)
    )
    result = _run(mac, "pre.yml")
    assert result.returncode == 2, show(result)
    assert "mini1: macOS needs the Xcode command line tools for /usr/bin/python3" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_site_stops_before_fact_gathering_without_the_command_line_tools(
    mac: dict[str, Path],
) -> None:
    """On a fresh Mac /usr/bin/python3 is only the tools' install shim, so fact gathering would
    die first with a module failure: site.yml's first play (no facts, raw) says what to install."""
    state = fake_macos.read_state(mac["state"])
    state.update(clt=False)
    (mac["state"] / "state.json").write_text(json.dumps(state))
    uname = mac["bin"] / "uname"  # what a Mac's uname -s says
    uname.write_text("#!/bin/sh\necho Darwin\n")
    uname.chmod(0o755)
    (mac["dir"] / "site.yml").write_text((REPO / "site.yml").read_text())
    result = _run(mac, "site.yml")
    assert result.returncode == 2, show(result)
    for host in ("mini1", "macbook"):
        assert f"{host}: macOS needs the Xcode command line tools for /usr/bin/python3" in (
            result.stdout
        ), show(result)
    assert "Gathering Facts" not in result.stdout, show(result)
    assert [c["argv"] for c in fake_macos.calls(mac["state"])] == [["-p"], ["-p"]]


def test_per_cable_thunderbolt_mode_sets_up_twice_and_restores(mac: dict[str, Path]) -> None:
    """A ring of three minis must not sit under one bridge (it storms): p2p mode gives each
    cable its own service and /30 and turns the bridge service off. On the fake Mac: set up
    (services created on the Thunderbolt ports), again with changed=0, then restore."""
    inv = mac["dir"] / "inventory.yml"
    data = yaml.safe_load(inv.read_text())
    mini1 = data["all"]["children"]["server"]["hosts"]["mini1"]
    mini1.update(
        network_thunderbolt_mode="p2p",
        cluster_forwarding=False,
        cluster_routes=[],
        cluster_interfaces=[
            {"link": "tb-mini1-mini2", "address": "10.10.1.1", "prefix": 30,
             "macos_hardware_port": "Thunderbolt 1"},
            {"link": "tb-mini1-mini3", "address": "10.10.1.5", "prefix": 30,
             "macos_hardware_port": "Thunderbolt 2"},
        ],
    )  # fmt: skip
    inv.write_text(yaml.safe_dump(data))
    plays = [PRETEND, _play("Network", [_role("network")])]
    (mac["dir"] / "net.yml").write_text(yaml.safe_dump(plays, sort_keys=False))
    restore = [PRETEND, _play("Restore", [_role("network", "restore.yml")])]
    (mac["dir"] / "restore.yml").write_text(yaml.safe_dump(restore, sort_keys=False))
    before = fake_macos.read_state(mac["state"])

    first = _run(mac, "net.yml", "--limit", "mini1")
    assert first.returncode == 0, show(first)
    svc = {s["name"]: s for s in fake_macos.read_state(mac["state"])["services"]}
    assert not svc["Thunderbolt Bridge"]["enabled"]  # no bridge, so no loop
    by_port = {s["port"]: s for s in svc.values()}
    assert (by_port["Thunderbolt 1"]["ip"], by_port["Thunderbolt 1"]["mask"]) == (
        "10.10.1.1", "255.255.255.252",
    )  # fmt: skip
    assert by_port["Thunderbolt 2"]["ip"] == "10.10.1.5"

    second = _run(mac, "net.yml", "--limit", "mini1")
    assert second.returncode == 0, show(second)
    assert {h: r["changed"] for h, r in recap(second.stdout).items()} == {"mini1": 0}

    back = _run(mac, "restore.yml", "--limit", "mini1")
    assert back.returncode == 0, show(back)
    after = {s["name"]: s for s in fake_macos.read_state(mac["state"])["services"]}
    for name, old in {s["name"]: s for s in before["services"]}.items():
        assert after[name] == old, name
    contract = _contract()
    ran = [[c["tool"], *c["argv"]] for c in fake_macos.calls(mac["state"]) if c["tool"] != "sudo"]
    assert [argv for argv in ran if not _in_contract(argv, contract)] == []
