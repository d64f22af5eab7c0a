"""doctor's Darwin rungs against fake Macs (tests/fake_macos.py): one real ansible-playbook run
of preflight's doctor task files and its verdict over four fake Macs, each with its own stubs
and state (facts say Darwin, PATH starts with its stubs). The one set up as site.yml leaves a
Mac is green; each of the others is broken on purpose in one way and gets its own line naming
the host, the rung and the fix. The handshake rung is tests/test_doctor.py's and the lab's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from smolcluster.harness import free_port
from smolcluster.protocol import write_secret
from tests import fake_macos
from tests.ansible_helpers import REPO, show
from tests.test_fake_macos_run import (
    FAKE_FACTS,
    PRETEND,
    _contract,
    _in_contract,
    _play,
    _role,
    _run,
    _user,
)

# What site.yml leaves on mini1 (tests/test_fake_macos_run.py checks it gets there): the bridge
# and the dongle hold their addresses, the far subnet is routed via mini3, and the Mac forwards.
SET_UP = {"forwarding": "1", "routes": [["192.168.51.0", "255.255.255.0", "10.10.0.3"]],
          "stealth": False}  # fmt: skip
BROKEN = {
    "mac-ok": {},
    "mac-noroute": {"routes": []},
    "mac-nofwd": {"forwarding": "0"},
    "mac-stealth": {"stealth": True},
}
FIX = {
    "mac-ok": "ok",
    "mac-noroute": (
        "routes: mac-noroute: 192.168.51.0/24 should be routed via 10.10.0.3, but 192.168.51.1 "
        "goes via 192.0.2.1 dev en1: the cluster route is missing; fix: run site.yml (network "
        "role)"
    ),
    "mac-nofwd": (
        "routes: mac-nofwd: IP forwarding is off on this gateway, so the hosts behind it cannot "
        "reach the server; fix: run site.yml (network role: forwarding and its boot unit)"
    ),
    "mac-stealth": (
        "firewall: mac-stealth: Application Firewall stealth mode is on, so this Mac answers no "
        "ping and refuses no connection (they time out); fix: sudo {fw} --setstealthmode off"
    ),
}


def _state(routes: list[list[str]], forwarding: str, stealth: bool) -> dict[str, Any]:
    state = fake_macos.mac_mini(admins=[_user()])
    svc = {s["name"]: s for s in state["services"]}
    svc["Thunderbolt Bridge"].update(method="manual", ip="10.10.0.1", mask="255.255.255.0",
                                     routes=routes)  # fmt: skip
    svc["USB 10/100/1000 LAN"].update(method="manual", ip="192.168.50.1", mask="255.255.255.0")
    state["sysctl"]["net.inet.ip.forwarding"] = forwarding
    state["firewall"]["stealth"] = stealth
    return state


def _fake_mac(tmp_path: Path, name: str, state: dict[str, Any]) -> dict[str, Any]:
    """Install host `name`'s fake Mac; its inventory vars common to every test here."""
    bin_dir = tmp_path / name / "bin"
    fake_macos.install(bin_dir, tmp_path / name / "fake-mac", state)
    return {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "smolcluster_venv": sys.prefix,
        "smolcluster_root": str(tmp_path / name / "root"),
        "fake_macos_bin": str(bin_dir),
    }


def _write_inventory(tmp_path: Path, inventory: dict[str, Any]) -> None:
    """The inventory, the repo's group_vars and the fake facts module beside it."""
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "group_vars").symlink_to(REPO / "group_vars")
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "fake_darwin_facts.py").write_text(FAKE_FACTS)


@pytest.fixture
def macs(tmp_path: Path) -> dict[str, Any]:
    hosts = {}
    for name, broken in BROKEN.items():
        hosts[name] = _fake_mac(tmp_path, name, _state(**{**SET_UP, **broken}))
        hosts[name] |= {
            "preflight_socketfilterfw": f"{hosts[name]['fake_macos_bin']}/socketfilterfw",
            "preflight_check_port": False,
            "cluster_forwarding": True,
            "cluster_interfaces": [
                {"link": "fabric", "address": "10.10.0.1", "prefix": 24,
                 "macos_service": "Thunderbolt Bridge"},
                {"link": "edge50", "address": "192.168.50.1", "prefix": 24,
                 "macos_hardware_port": "USB 10/100/1000 LAN"},
            ],
            "cluster_routes": [{"to": "192.168.51.0/24", "via": "10.10.0.3"}],
        }  # fmt: skip
    # Four gateways of one shape; each its own Mac. In group macs: the launchd backend.
    inventory = {"all": {"children": {"server": {"hosts": hosts},
                                      "macs": {"hosts": dict.fromkeys(hosts)}}}}  # fmt: skip
    _write_inventory(tmp_path, inventory)
    # Each host's commands find its own stubs first (raw ignores `environment`: the ssh rung's
    # `uname -s` and the become rung's sudo come from the shared bin below).
    env = {"PATH": "{{ fake_macos_bin }}:" + str(tmp_path / "bin") + ":{{ lookup('env', 'PATH') }}"}
    plays = [
        {**PRETEND, "environment": env},
        {**_play("Doctor, each host", [_role("preflight", "doctor.yml")]), "environment": env},
        {**_play("Doctor, the verdict", [_role("preflight", "doctor-verdict.yml")]),
         "environment": env, "any_errors_fatal": True},
    ]  # fmt: skip
    (tmp_path / "doctor-macs.yml").write_text(yaml.safe_dump(plays, sort_keys=False))
    shared = tmp_path / "bin"
    fake_macos.install(shared, tmp_path / "shared-state", fake_macos.mac_mini())  # sudo
    (shared / "uname").write_text("#!/bin/sh\necho Darwin\n")
    (shared / "uname").chmod(0o755)
    return {"dir": tmp_path, "bin": shared}


def _verdict(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """The verdict's lines, `<host>: ok` or `<host>: <rung>: ...`, from its debug task (the
    YAML callback wraps long strings: unwrap first)."""
    block = result.stdout.split("TASK [preflight : One line per host]", 1)[1]
    block = block.split("TASK [", 1)[0].split("msg:", 1)[1]
    return dict(line.split(": ", 1) for line in yaml.safe_load(block))


def test_doctor_names_each_broken_mac_and_passes_the_set_up_one(macs: dict[str, Any]) -> None:
    result = _run(macs, "doctor-macs.yml", "-f", "4")
    assert result.returncode == 2, show(result)
    fw = {h: macs["dir"] / h / "bin" / "socketfilterfw" for h in BROKEN}
    expected = {h: line.format(fw=fw[h]) for h, line in FIX.items()}
    assert _verdict(result) == expected, show(result)
    for host in BROKEN:
        if host != "mac-ok":
            assert f"doctor: {host}: {expected[host]}" in " ".join(result.stdout.split())
    # The rungs asked each fake Mac (not this Linux machine) what it has.
    ran = [[c["tool"], *c["argv"]] for c in fake_macos.calls(macs["dir"] / "mac-ok" / "fake-mac")]
    asked = [
        ["route", "-n", "get", "192.168.51.1"],
        ["sysctl", "-n", "net.inet.ip.forwarding"],
        ["socketfilterfw", "--getstealthmode"],
        ["netstat", "-rn", "-f", "inet"],
        ["networksetup", "-getinfo", "Thunderbolt Bridge"],
        ["sw_vers", "-productVersion"],
    ]
    assert [argv for argv in asked if argv not in ran] == []
    # Every macOS command the doctor ran is one docs/macos-contract.md lists.
    contract = _contract()
    for host in BROKEN:
        calls = fake_macos.calls(macs["dir"] / host / "fake-mac")
        assert [c for c in calls if not _in_contract([c["tool"], *c["argv"]], contract)] == []


def test_the_handshake_runs_as_launchdaemons_of_the_fake_launchd(tmp_path: Path) -> None:
    """doctor-handshake.yml on three fake Macs (launchd backend): each side is a one-shot
    LaunchDaemon that the fake launchd really starts at bootstrap (RunAtLoad), so the listener
    and the dials are real processes on 127.0.0.1, outside the playbook's session. mini3 holds
    another secret: its own line says so. Afterwards no daemon and no plist is left."""
    port = free_port()
    daemons = tmp_path / "LaunchDaemons"
    daemons.mkdir()
    hosts: dict[str, dict[str, Any]] = {}
    for name in ("mini1", "mini2", "mini3"):
        hosts[name] = _fake_mac(tmp_path, name, fake_macos.mac_mini(run_programs=True))
        config = tmp_path / name / "config"
        config.mkdir(parents=True)
        write_secret(config / "secret")
        hosts[name] |= {
            "smolcluster_config_dir": str(config),
            "smolcluster_bind_address": "127.0.0.1",
            "smolcluster_port": port,
            "smolcluster_doctor_launchd_plist": f"{daemons}/org.smolcluster.doctor.{name}.plist",
            "trainer_launchd_plist_group": "root",
            "preflight_doctor_listen_s": 20,
            "preflight_doctor_dial_wait_s": 10,
            "cluster_interfaces": [],
        }  # fmt: skip
        if name != "mini1":
            hosts[name]["cluster_dial_address"] = "127.0.0.1"
    (tmp_path / "mini2" / "config" / "secret").write_bytes(
        (tmp_path / "mini1" / "config" / "secret").read_bytes()
    )
    inventory = {"all": {"children": {
        "server": {"hosts": {"mini1": hosts["mini1"]}},
        "workers": {"hosts": {"mini2": hosts["mini2"], "mini3": hosts["mini3"]}},
        "macs": {"hosts": dict.fromkeys(hosts)},
    }}}  # fmt: skip
    _write_inventory(tmp_path, inventory)
    env = {"PATH": "{{ fake_macos_bin }}:{{ lookup('env', 'PATH') }}"}
    plays = [
        {**PRETEND, "environment": env},
        {**_play("Handshake", [_role("preflight", "doctor-handshake.yml")]), "environment": env},
        {**_play("Verdict", [_role("preflight", "doctor-verdict.yml")]), "environment": env},
    ]
    (tmp_path / "handshake.yml").write_text(yaml.safe_dump(plays, sort_keys=False))
    shared = tmp_path / "bin"  # the become rung's sudo (the Ansible process's own PATH)
    fake_macos.install(shared, tmp_path / "shared-state", fake_macos.mac_mini())

    result = _run({"dir": tmp_path, "bin": shared}, "handshake.yml")
    assert result.returncode == 2, show(result)
    lines = _verdict(result)
    assert lines["mini1"] == "ok" and lines["mini2"] == "ok", show(result)
    wrong = f"handshake: mini3 reached 127.0.0.1:{port} but the handshake failed: this host's"
    assert lines["mini3"].startswith(f"{wrong} cluster secret differs"), show(result)
    for name in hosts:
        label = f"org.smolcluster.doctor.{name}"
        ran = [c["argv"] for c in fake_macos.calls(tmp_path / name / "fake-mac")]
        assert ["bootstrap", "system", f"{daemons}/{label}.plist"] in ran, name
        assert ran[-1] == ["bootout", f"system/{label}"], name
        assert fake_macos.read_state(tmp_path / name / "fake-mac")["launchd"] == {}
        assert all(_in_contract(["launchctl", *argv], _contract()) for argv in ran), ran
    # The dial wrote its line where the daemon's command line sends it.
    log = tmp_path / "mini2" / "root" / "run" / "mini2.doctor.log"
    assert f"mini2 -> 127.0.0.1:{port}: authenticated handshake ok" in log.read_text()
    assert list(daemons.iterdir()) == []
