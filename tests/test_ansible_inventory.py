"""Wrong inventories and variables fail early, naming the problem; the real cluster
inventory's addresses resolve as documented (read with ansible-inventory, never dialled)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from smolcluster.harness import free_port
from tests.ansible_helpers import (
    BIN,
    REPO,
    load_plugin,
    playbook,
    scratch_checkout,
    show,
)

LOCAL = {
    "ansible_connection": "local",
    "ansible_python_interpreter": "{{ ansible_playbook_python }}",
}


def _write_inventory(tmp_path: Path, server: list[str], workers: dict[str, dict]) -> Path:
    hosts = {name: {**LOCAL, "cluster_dial_address": "127.0.0.1"} for name in server}
    inventory = {
        "all": {
            "vars": {"smolcluster_root": str(tmp_path / "{{ inventory_hostname }}")},
            "children": {
                "server": {"hosts": hosts},
                "workers": {"hosts": {n: {**LOCAL, **v} for n, v in workers.items()}},
            },
        }
    }
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


def _preflight(inventory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # Only the preflight play's checks run; nothing is created or changed.
    return playbook(
        REPO, "site.yml", "-i", str(inventory), "--tags", "preflight",
        "-e", f"smolcluster_port={free_port()}", "-e", "preflight_install_tools=false", *extra,
    )  # fmt: skip


def test_two_servers_fail_naming_them(tmp_path: Path) -> None:
    inventory = _write_inventory(
        tmp_path, ["mini1", "mini2"], {"mini3": {"cluster_dial_address": "127.0.0.1"}}
    )
    result = _preflight(inventory)
    assert result.returncode != 0
    assert "group 'server' must hold exactly one host, found 2: mini1, mini2" in result.stdout, (
        show(result)
    )


def test_worker_without_server_address_fails_naming_it(tmp_path: Path) -> None:
    lonely = {"cluster_interfaces": [{"link": "edge99", "address": "192.168.99.2", "prefix": 24}]}
    inventory = _write_inventory(
        tmp_path, ["mini1"], {"mini2": {"cluster_dial_address": "127.0.0.1"}, "pi9": lonely}
    )
    result = _preflight(inventory)
    assert result.returncode != 0
    assert "worker pi9 has no server address" in result.stdout, show(result)
    assert "worker mini2" not in result.stdout


def test_typo_in_role_variable_fails_naming_it(tmp_path: Path) -> None:
    inventory = _write_inventory(
        tmp_path, ["mini1"], {"mini2": {"cluster_dial_address": "127.0.0.1"}}
    )
    result = _preflight(inventory, "-e", "trainer_epoch=3", "-e", "network_thunderbolt_mod=p2p")
    assert result.returncode != 0
    assert (
        "unknown variable(s) on mini1: network_thunderbolt_mod, trainer_epoch" in result.stdout
    ), show(result)


def test_ill_typed_role_variable_fails_naming_it(tmp_path: Path) -> None:
    inventory = _write_inventory(
        tmp_path, ["mini1"], {"mini2": {"cluster_dial_address": "127.0.0.1"}}
    )
    result = _preflight(inventory, "-e", "trainer_batch_size=lots")
    assert result.returncode != 0
    assert "trainer_batch_size" in result.stdout, show(result)
    assert not (tmp_path / "mini1").exists()  # failed before anything was created


def test_bad_choice_fails_in_argument_specs(tmp_path: Path) -> None:
    inventory = _write_inventory(
        tmp_path, ["mini1"], {"mini2": {"cluster_dial_address": "127.0.0.1"}}
    )
    result = _preflight(inventory, "-e", "python_env_tool=conda")
    assert result.returncode != 0
    assert "python_env_tool" in result.stdout and "conda" in result.stdout, show(result)


def _filters():
    return load_plugin(REPO / "ansible" / "plugins" / "filter" / "smolcluster.py")


@pytest.fixture(scope="module")
def cluster_inventory() -> tuple[dict, dict]:
    out = subprocess.run(
        [str(BIN / "ansible-inventory"), "-i", str(REPO / "inventory" / "cluster.yml"), "--list"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    listing = json.loads(out)
    hostvars = listing["_meta"]["hostvars"]
    groups = {name: body.get("hosts", []) for name, body in listing.items() if name != "_meta"}
    groups["all"] = sorted(hostvars)
    return hostvars, groups


def test_cluster_inventory_host_ip_follows_the_links(cluster_inventory) -> None:
    hostvars, groups = cluster_inventory
    filters = _filters()
    assert groups["server"] == ["mini1"]
    assert sorted(groups["workers"]) == ["macbook", "mini2", "mini3", "pi4", "pi5"]
    assert filters.inventory_errors(hostvars, groups, groups["workers"]) == []
    table = filters.host_ip(hostvars, "mini1", groups["workers"])
    assert table == {
        "mini1": "10.10.0.1",
        "mini2": "10.10.0.1",  # Thunderbolt fabric
        "mini3": "10.10.0.1",
        "pi5": "192.168.50.1",  # its own Ethernet link to mini1
        "pi4": "10.10.0.1",  # routed through mini3 to the fabric
        "macbook": "192.168.1.11",  # Wi-Fi: the explicit dial address
    }


def test_gloo_mesh_gaps_are_the_pis_on_the_cluster_and_none_locally(cluster_inventory) -> None:
    """gloo needs a full mesh (F15): on the real cluster only pi4 and pi5 cannot reach each
    other; the local default (no cluster links) is a mesh."""
    hostvars, groups = cluster_inventory
    hosts = ["mini1", *groups["workers"]]
    assert [sorted(pair) for pair in _filters().mesh_gaps(hostvars, hosts)] == [["pi4", "pi5"]]
    assert _filters().mesh_gaps(hostvars, ["mini1", "mini2", "pi4"]) == []
    local = {host: {"cluster_interfaces": []} for host in hosts}
    assert _filters().mesh_gaps(local, hosts) == []


def test_gloo_is_refused_when_two_workers_share_no_link_or_route(tmp_path: Path) -> None:
    """Two Pis, each on its own cable to a different gateway, routed only to the fabric."""
    pis = {
        name: {"cluster_dial_address": "127.0.0.1", "cluster_manage_network": False,
               "cluster_interfaces": [{"link": link, "address": address, "prefix": 24}],
               "cluster_routes": [{"to": "10.10.0.0/24", "via": via}]}
        for name, link, address, via in [("pi4", "edge51", "192.168.51.4", "192.168.51.2"),
                                         ("pi5", "edge50", "192.168.50.2", "192.168.50.1")]
    }  # fmt: skip
    inventory = _write_inventory(tmp_path, ["mini1"], pis)
    result = _preflight(inventory, "-e", "backend=gloo", "-e", "cluster_manage_network=false")
    assert result.returncode != 0, show(result)
    assert (
        "inventory: backend gloo needs every host in the run to reach every other, but pi4 and "
        "pi5 share no link or route (the Pis are apart by design)" in result.stdout
    ), show(result)
    assert _preflight(inventory, "-e", "cluster_manage_network=false").returncode == 0


def test_duplicate_address_and_split_subnet_are_reported(cluster_inventory) -> None:
    hostvars, groups = cluster_inventory
    hostvars = json.loads(json.dumps(hostvars))
    hostvars["mini2"]["cluster_interfaces"][0]["address"] = "10.10.0.3"
    hostvars["pi5"]["cluster_interfaces"][0]["address"] = "192.168.60.2"
    errors = _filters().inventory_errors(hostvars, groups, groups["workers"])
    assert "address 10.10.0.3 is used by both mini2 and mini3" in errors
    assert any(e.startswith("link edge50 spans several subnets") for e in errors)
    assert "host pi5: route to 10.10.0.0/24 via 192.168.50.1 is on none of its links" in errors


def _become_password(checkout: Path, *extra: str) -> str:
    """What ansible_become_password renders to on mini1 of inventory/cluster.yml (local
    connection: nothing is dialled; debug runs on the controller)."""
    result = subprocess.run(
        [str(BIN / "ansible"), "mini1", "-i", "inventory/cluster.yml", "-c", "local",
         "-m", "ansible.builtin.debug",
         "-a", "msg={{ 'NONE' if ansible_become_password is none else ansible_become_password }}",
         *extra],
        cwd=checkout, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.split("=>", 1)[1])["msg"]


def test_mac_sudo_password_comes_from_the_vault_file_or_stays_unset_for_k(tmp_path: Path) -> None:
    checkout = scratch_checkout(tmp_path)
    # No vault file: the variable is none, so -K's password is used (none beats nothing).
    assert _become_password(checkout) == "NONE"
    # The documented way: an ansible-vault encrypted group_vars/macs/vault.yml.
    secret = tmp_path / "vault-pass"
    secret.write_text("lab-vault-key\n")
    plain = checkout / "group_vars" / "macs" / "vault.yml"
    plain.write_text("vault_macs_become_password: 'mac sudo pw'\n")
    subprocess.run(
        [str(BIN / "ansible-vault"), "encrypt", "--vault-password-file", str(secret), str(plain)],
        cwd=checkout, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert plain.read_text().startswith("$ANSIBLE_VAULT;")
    assert _become_password(checkout, "--vault-password-file", str(secret)) == "mac sudo pw"
