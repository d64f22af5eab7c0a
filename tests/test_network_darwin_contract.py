"""The macOS commands of the network role, checked against the contract in docs/network.md.

macOS cannot run here, so the role's Darwin planning tasks run for real (ansible-playbook,
network_darwin_plan_only) on given `networksetup` outputs, and the argv lists they produce must
equal the `sh` blocks marked `<!-- contract: <host> <scenario> -->` in docs/network.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "network.md"
PLAYBOOK_BIN = Path(sys.executable).with_name("ansible-playbook")

SERVICES_LIST = (
    "An asterisk (*) denotes that a network service is disabled.\n"
    "Wi-Fi\nThunderbolt Bridge\nUSB 10/100/1000 LAN\n"
)
# networksetup -listallhardwareports / -listnetworkserviceorder on a mini with a USB dongle.
HARDWARE_PORTS = "".join(
    f"\nHardware Port: {port}\nDevice: {dev}\nEthernet Address: N/A\n"
    for port, dev in [("Wi-Fi", "en1"), ("Thunderbolt 1", "en2"), ("Thunderbolt 2", "en3"),
                      ("Thunderbolt Bridge", "bridge0"), ("USB 10/100/1000 LAN", "en5")]
)  # fmt: skip
SERVICE_ORDER = (
    "An asterisk (*) denotes that a network service is disabled.\n"
    "(1) Wi-Fi\n(Hardware Port: Wi-Fi, Device: en1)\n\n"
    "(2) Thunderbolt Bridge\n(Hardware Port: Thunderbolt Bridge, Device: bridge0)\n\n"
    "(3) USB 10/100/1000 LAN\n(Hardware Port: USB 10/100/1000 LAN, Device: en5)\n"
)
DHCP_INFO = (
    "DHCP Configuration\nIP address: 169.254.10.20\nSubnet mask: 255.255.0.0\nRouter: (null)\n"
)
NO_ROUTES = "There are no additional IPv4 routes on this service.\n"

# Host variables exactly as the cluster inventory gives them (CONTRACT.md).
HOSTS: dict[str, dict] = {
    "mini1": {
        "cluster_interfaces": [
            {
                "link": "fabric",
                "address": "10.10.0.1",
                "prefix": 24,
                "macos_service": "Thunderbolt Bridge",
                "linux_device": "tb0",
            },
            {
                "link": "edge50",
                "address": "192.168.50.1",
                "prefix": 24,
                "macos_service": "USB 10/100/1000 LAN",
                "linux_device": "eth0",
            },
        ],
        "cluster_routes": [{"to": "192.168.51.0/24", "via": "10.10.0.3"}],
        "cluster_forwarding": True,
    },
    "mini3": {
        "cluster_interfaces": [
            {
                "link": "fabric",
                "address": "10.10.0.3",
                "prefix": 24,
                "macos_service": "Thunderbolt Bridge",
                "linux_device": "tb0",
            },
            {
                "link": "edge51",
                "address": "192.168.51.2",
                "prefix": 24,
                "macos_service": "USB 10/100/1000 LAN",
                "linux_device": "eth0",
            },
        ],
        "cluster_routes": [{"to": "192.168.50.0/24", "via": "10.10.0.1"}],
        "cluster_forwarding": True,
    },
}


def manual(ip: str, mask: str = "255.255.255.0") -> str:
    return f"Manual Configuration\nIP address: {ip}\nSubnet mask: {mask}\nRouter: (null)\n"


def fresh() -> dict:
    """A Mac out of the box: services on DHCP/link-local, no extra routes, no forwarding."""
    return {
        "services_list": SERVICES_LIST,
        "hardware_ports": HARDWARE_PORTS,
        "service_order": SERVICE_ORDER,
        "forwarding": "0",
        "services": {
            "Thunderbolt Bridge": {"getinfo": DHCP_INFO, "routes": NO_ROUTES},
            "USB 10/100/1000 LAN": {"getinfo": DHCP_INFO, "routes": NO_ROUTES},
        },
    }


def configured(host: str) -> dict:
    """The state the role leaves behind: a second run must plan nothing."""
    ifaces = HOSTS[host]["cluster_interfaces"]
    route = HOSTS[host]["cluster_routes"][0]
    dest, bits = route["to"].split("/")
    assert bits == "24"
    return {
        "services_list": SERVICES_LIST,
        "hardware_ports": HARDWARE_PORTS,
        "service_order": SERVICE_ORDER,
        "forwarding": "1",
        "services": {
            "Thunderbolt Bridge": {
                "getinfo": manual(ifaces[0]["address"]),
                "routes": f"{dest} 255.255.255.0 {route['via']}\n",
            },
            "USB 10/100/1000 LAN": {"getinfo": manual(ifaces[1]["address"]), "routes": NO_ROUTES},
        },
    }


def with_foreign_route() -> dict:
    """The user already has a route on the bridge; -setadditionalroutes must keep it."""
    state = fresh()
    state["services"]["Thunderbolt Bridge"] = {
        "getinfo": manual("10.10.0.1"),
        "routes": "172.31.9.0 255.255.255.0 10.10.0.9\n",
    }
    return state


def p2p_vars() -> dict:
    """mini1 in p2p mode: one /30 per Thunderbolt cable, its own service per port."""
    return {
        "network_thunderbolt_mode": "p2p",
        "network_interfaces": [
            {
                "link": "tb-mini1-mini2",
                "address": "10.10.1.1",
                "prefix": 30,
                "macos_service": "Thunderbolt 1",
                "linux_device": "tb1",
            },
            {
                "link": "tb-mini1-mini3",
                "address": "10.10.1.5",
                "prefix": 30,
                "macos_service": "Thunderbolt 2",
                "linux_device": "tb2",
            },
        ],
        "network_routes": [],
        "network_forwarding": False,
    }


SCENARIOS: dict[str, tuple[str, dict, dict]] = {
    # name: (host, observed state, extra vars)
    "mini1 fresh": ("mini1", fresh(), {}),
    "mini3 fresh": ("mini3", fresh(), {}),
    "mini1 configured": ("mini1", configured("mini1"), {}),
    "mini3 configured": ("mini3", configured("mini3"), {}),
    "mini1 foreign-route": ("mini1", with_foreign_route(), {}),
    "mini1 p2p": ("mini1", fresh(), p2p_vars()),
}


def doc_contract() -> dict[str, list[str]]:
    """`<!-- contract: host scenario -->` followed by a ```sh block -> its command lines."""
    text = DOC.read_text()
    blocks = re.findall(r"<!-- contract: ([\w-]+ [\w-]+) -->\s*```sh\n(.*?)```", text, re.S)
    return {
        name: [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.startswith("#")]
        for name, body in blocks
    }


def slug(scenario: str) -> str:
    return scenario.replace(" ", "_")


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Run the role's plan entry points once for every scenario (one inventory host each)."""
    tmp = tmp_path_factory.mktemp("darwin-plan")
    local = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "network_darwin_plan_only": True,
    }
    hosts = {
        slug(name): {**local, **HOSTS[host], "network_darwin_observed": observed, **extra}
        for name, (host, observed, extra) in SCENARIOS.items()
    }
    hosts["mini1_restore"] = {**local, **HOSTS["mini1"], "network__saved": fresh()}
    inventory = {
        "all": {
            "children": {
                "plan": {"hosts": {k: v for k, v in hosts.items() if k != "mini1_restore"}},
                "restore": {"hosts": {"mini1_restore": hosts["mini1_restore"]}},
            }
        }
    }
    (tmp / "inventory.json").write_text(json.dumps(inventory))

    def play(group: str, tasks_from: str, fact: str) -> dict:
        return {
            "name": f"Plan {group}",
            "hosts": group,
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Plan",
                    "ansible.builtin.include_role": {"name": "network", "tasks_from": tasks_from},
                },
                {
                    "name": "Write",
                    "ansible.builtin.copy": {
                        "content": "{{ " + fact + " | to_json }}",
                        "dest": f"{tmp}/{{{{ inventory_hostname }}}}.json",
                        "mode": "0644",
                    },
                },
            ],
        }

    playbook = [
        play("plan", "darwin_plan.yml", "network__darwin_commands"),
        play("restore", "restore-Darwin.yml", "network__darwin_restore_commands"),
    ]
    (tmp / "plan.yml").write_text(yaml.safe_dump(playbook, sort_keys=False))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "roles"), "ANSIBLE_NOCOLOR": "1"}
    proc = subprocess.run(
        [str(PLAYBOOK_BIN), "-i", "inventory.json", "plan.yml"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {
        name: [shlex.join(c["argv"]) for c in json.loads((tmp / f"{slug(name)}.json").read_text())]
        for name in [*SCENARIOS, "mini1 restore"]
    }


def test_docs_hold_every_scenario() -> None:
    missing = (set(SCENARIOS) | {"mini1 restore"}) - set(doc_contract())
    assert not missing, f"docs/network.md lacks contract blocks: {sorted(missing)}"


@pytest.mark.parametrize("scenario", [*sorted(SCENARIOS), "mini1 restore"])
def test_darwin_plan_matches_contract(plans: dict[str, list[str]], scenario: str) -> None:
    assert plans[scenario] == doc_contract()[scenario]


def test_configured_mac_plans_nothing(plans: dict[str, list[str]]) -> None:
    # The idempotence promise on macOS: the state the role leaves yields an empty plan.
    assert plans["mini1 configured"] == plans["mini3 configured"] == []


def test_existing_routes_are_kept(plans: dict[str, list[str]]) -> None:
    # -setadditionalroutes replaces the whole list: the user's route must be in the new one.
    (setroutes,) = [c for c in plans["mini1 foreign-route"] if "-setadditionalroutes" in c]
    assert "172.31.9.0 255.255.255.0 10.10.0.9" in setroutes
