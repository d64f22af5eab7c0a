"""Static checks of the network role: lint, argument_specs and the validation it runs first.

Every playbook here runs only the role's planning entry point (darwin_plan.yml with
network_darwin_plan_only), which computes commands and never runs one, so a wrong verdict
cannot touch this machine's network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

GOOD_IFACE = {
    "link": "fabric",
    "address": "10.10.0.1",
    "prefix": 24,
    "macos_service": "Thunderbolt Bridge",
    "linux_device": "tb0",
}


def run_role(tmp_path: Path, host_vars: dict) -> subprocess.CompletedProcess[str]:
    inventory = {
        "all": {
            "hosts": {
                "mini1": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": sys.executable,
                    "network_darwin_plan_only": True,
                    # The Mac has the service the links name (darwin_services.yml checks it).
                    "network_darwin_observed": {
                        "services_list": "An asterisk (*) denotes that a network service is "
                        "disabled.\nThunderbolt Bridge\n"
                    },
                    **host_vars,
                }
            }
        }
    }
    (tmp_path / "inventory.yml").write_text(json.dumps(inventory))
    playbook = [
        {
            "name": "Plan only",
            "hosts": "all",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Role",
                    "ansible.builtin.include_role": {
                        "name": "network",
                        "tasks_from": "darwin_plan.yml",
                    },
                }
            ],
        }
    ]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(playbook, sort_keys=False))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "roles"), "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "inventory.yml", "play.yml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_good_variables_pass(tmp_path: Path) -> None:
    proc = run_role(
        tmp_path,
        {
            "cluster_interfaces": [GOOD_IFACE],
            "cluster_routes": [{"to": "192.168.51.0/24", "via": "10.10.0.3"}],
        },
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "changed=0" in proc.stdout


@pytest.mark.parametrize(
    ("host_vars", "named"),
    [
        # argument_specs: a wrong choice, a typo'd key inside an interface, a wrong type
        ({"network_thunderbolt_mode": "ring"}, "network_thunderbolt_mode"),
        ({"cluster_interfaces": [{**GOOD_IFACE, "adress": "10.10.0.9"}]}, "adress"),
        ({"cluster_interfaces": [{**GOOD_IFACE, "prefix": "wide"}]}, "prefix"),
        ({"network_linux_backend": "netplan"}, "network_linux_backend"),
        # validate.yml: values argument_specs cannot judge
        (
            {"cluster_interfaces": [{**GOOD_IFACE, "address": "10.10.0.300"}]},
            "network_interfaces[0]",
        ),
        (
            {
                "cluster_interfaces": [GOOD_IFACE],
                "cluster_routes": [{"to": "0.0.0.0/0", "via": "10.10.0.3"}],
            },
            "default route",
        ),
        (
            {
                "cluster_interfaces": [GOOD_IFACE],
                "cluster_routes": [{"to": "10.20.0.0/24", "via": "192.168.7.1"}],
            },
            "network_routes[0]",
        ),
    ],
)
def test_bad_variable_fails_naming_it(tmp_path: Path, host_vars: dict, named: str) -> None:
    proc = run_role(tmp_path, host_vars)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert named in proc.stdout + proc.stderr
    # It fails before the plan is computed, let alone run.
    assert "Compute the macOS commands from the observed state" not in proc.stdout


def test_ansible_lint_production_clean() -> None:
    proc = subprocess.run(
        [
            str(BIN / "ansible-lint"),
            "--profile",
            "production",
            "--offline",
            "roles/network",
            "tests/lab/network.yml",
            "tests/lab/network-restore.yml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
