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
    doctor_lines,
    load_plugin,
    local_inventory,
    playbook,
    preflight,
    scratch_checkout,
    show,
)


def test_two_servers_fail_naming_them(tmp_path: Path) -> None:
    inventory = local_inventory(
        tmp_path, ["mini1", "mini2"], {"mini3": {"cluster_dial_address": "127.0.0.1"}}
    )
    result = preflight(inventory)
    assert result.returncode != 0
    assert "group 'server' must hold exactly one host, found 2: mini1, mini2" in result.stdout, (
        show(result)
    )


def test_worker_without_server_address_fails_naming_it(tmp_path: Path) -> None:
    lonely = {"cluster_interfaces": [{"link": "edge99", "address": "192.168.99.2", "prefix": 24}]}
    inventory = local_inventory(
        tmp_path, ["mini1"], {"mini2": {"cluster_dial_address": "127.0.0.1"}, "pi9": lonely}
    )
    result = preflight(inventory)
    assert result.returncode != 0
    assert "worker pi9 has no server address" in result.stdout, show(result)
    assert "worker mini2" not in result.stdout


def test_typo_in_role_variable_fails_naming_it(tmp_path: Path) -> None:
    inventory = local_inventory(
        tmp_path, ["mini1"], {"mini2": {"cluster_dial_address": "127.0.0.1"}}
    )
    result = preflight(inventory, "-e", "trainer_epoch=3", "-e", "network_thunderbolt_mod=p2p")
    assert result.returncode != 0
    assert (
        "unknown variable(s) on mini1: network_thunderbolt_mod, trainer_epoch" in result.stdout
    ), show(result)


def test_ill_typed_role_variable_fails_naming_it(tmp_path: Path) -> None:
    inventory = local_inventory(
        tmp_path, ["mini1"], {"mini2": {"cluster_dial_address": "127.0.0.1"}}
    )
    # All of site.yml, not only its preflight: had preflight let the value by, python_env
    # would make mini1's root.
    result = playbook(
        REPO, "site.yml", "-i", str(inventory), "-e", "trainer_batch_size=lots",
        "-e", "cluster_manage_network=false", "-e", "preflight_install_tools=false",
    )  # fmt: skip
    assert result.returncode != 0
    assert "trainer_batch_size" in result.stdout, show(result)
    assert not (tmp_path / "mini1").exists()  # failed before anything was created


def test_a_list_or_mapping_where_a_string_is_wanted_fails_naming_it(tmp_path: Path) -> None:
    """Ansible's `type: str` check passes a list on as its repr (a root named "['a', 'b']"):
    preflight refuses it on every host, before anything is created."""
    inventory = local_inventory(
        tmp_path, ["mini1"], {"mini2": {"cluster_dial_address": "127.0.0.1"}}
    )
    bad = {"smolcluster_root": ["a", "b"], "dataset_directory": {"path": "x"}}
    result = preflight(inventory, "-e", json.dumps(bad))
    assert result.returncode != 0, show(result)
    for host in ("mini1", "mini2"):
        assert (
            f"not a string on {host}: dataset_directory is a mapping ({{'path': 'x'}}); "
            "smolcluster_root is a list (['a', 'b'])" in result.stdout
        ), show(result)
    string_vars = load_plugin(REPO / "roles" / "preflight" / "filter_plugins" / "string_vars.py")
    specs = {"a": {"x": {"type": "str"}, "y": {"type": "list"}}, "b": {"z": {}}}
    assert string_vars.string_options(specs) == ["x", "z"]  # no type given is a string


def test_bad_choice_fails_in_argument_specs(tmp_path: Path) -> None:
    inventory = local_inventory(
        tmp_path, ["mini1"], {"mini2": {"cluster_dial_address": "127.0.0.1"}}
    )
    result = preflight(inventory, "-e", "python_env_tool=conda")
    assert result.returncode != 0
    assert "python_env_tool" in result.stdout and "conda" in result.stdout, show(result)


def test_doctor_alone_names_a_typo_and_an_ill_typed_value(tmp_path: Path) -> None:
    """doctor.yml checks variables as site.yml and train.yml do, each host on its own line."""
    local = {"cluster_dial_address": "127.0.0.1"}
    inventory = local_inventory(
        tmp_path, ["mini1"],
        {"mini2": {**local, "trainer_epoch": 3}, "mini3": {**local, "trainer_batch_size": "lots"}},
    )  # fmt: skip
    result = playbook(
        REPO, "doctor.yml", "-i", str(inventory),
        "-e", "preflight_check_become=false", "-e", f"smolcluster_port={free_port()}",
    )  # fmt: skip
    assert result.returncode != 0, show(result)
    lines = doctor_lines(result.stdout)
    typo = "variables: unknown variable(s) on mini2: trainer_epoch (a typo?"
    assert lines["mini2"].startswith(typo), lines
    assert lines["mini3"].startswith("variables: "), lines
    assert "trainer_batch_size" in lines["mini3"] and "int" in lines["mini3"], lines
    assert not lines["mini1"].startswith("variables"), lines  # its own red rung: no venv yet


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
    inventory = local_inventory(tmp_path, ["mini1"], pis)
    result = preflight(inventory, "-e", "backend=gloo", "-e", "cluster_manage_network=false")
    assert result.returncode != 0, show(result)
    assert (
        "inventory: backend gloo needs every host in the run to reach every other, but pi4 and "
        "pi5 share no link or route (the Pis are apart by design)" in result.stdout
    ), show(result)
    assert preflight(inventory, "-e", "cluster_manage_network=false").returncode == 0


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


def test_a_group_variable_that_group_vars_overrides_fails_naming_it(tmp_path: Path) -> None:
    """Ansible lets group_vars/all.yml's port beat the one set for group all in the inventory
    file: preflight says so instead of training on another port than the user wrote."""
    inventory = local_inventory(
        tmp_path, ["mini1"], {"mini2": {"cluster_dial_address": "127.0.0.1"}}
    )
    text = yaml.safe_load(inventory.read_text())
    text["all"]["vars"] = {"smolcluster_port": 7000}
    inventory.write_text(yaml.safe_dump(text))
    result = preflight(inventory)
    assert result.returncode != 0
    assert (
        f"inventory: {inventory} sets smolcluster_port for group all, but group_vars/all.yml "
        "sets it for group all and wins on mini1, mini2" in result.stdout
    ), show(result)


def test_shadowed_group_vars_need_a_shared_host_and_skip_what_cannot_be_read(tmp_path) -> None:
    shadow = load_plugin(REPO / "roles" / "preflight" / "filter_plugins" / "shadowed_vars.py")
    gv = tmp_path / "group_vars"
    (gv / "macs").mkdir(parents=True)
    (gv / "all.yml").write_text("smolcluster_port: 65432\n")
    (gv / "macs" / "main.yml").write_text("ansible_python_interpreter: /usr/bin/python3\n")
    (gv / "macs" / "vault.yml").write_text("$ANSIBLE_VAULT;1.1;AES256\n6162636465\n")
    (gv / "pis.yml").write_text("token: !vault |\n  $ANSIBLE_VAULT;1.1;AES256\n  6162\n")
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {
        "macs": {"hosts": {"mini1": {}}, "vars": {"ansible_python_interpreter": "/opt/py"}},
        "pis": {"hosts": {"pi4": {}}, "vars": {"ansible_python_interpreter": "/usr/bin/py",
                                              "token": "x"}},
    }}}))  # fmt: skip
    groups = {"all": ["mini1", "pi4"], "macs": ["mini1"], "pis": ["pi4"]}
    errors = shadow.shadowed_errors([str(inventory)], str(tmp_path), groups)
    assert [e.split(" and wins")[0] for e in errors] == [
        # macs' interpreter is shadowed on mini1; pis' is not (no host in macs): pis keeps it.
        f"{inventory} sets ansible_python_interpreter for group macs, but "
        "group_vars/macs/main.yml sets it for group macs",
        f"{inventory} sets token for group pis, but group_vars/pis.yml sets it for group pis",
    ]
    ini = tmp_path / "hosts.ini"  # not YAML: skipped, not misread
    ini.write_text("[macs:vars]\nansible_python_interpreter=/opt/py\n")
    assert shadow.shadowed_errors([str(ini)], str(tmp_path), groups) == []


def test_an_inventorys_own_group_vars_are_checked_as_ansible_ranks_them(tmp_path: Path) -> None:
    """kubespray's layout, inventory/<cluster>/group_vars/: its all.yml loses to the playbooks'
    group_vars/, its pis.yml loses to theirs, its macs.yml beats their all.yml. The plugin names
    exactly the variables whose value ansible-inventory (with this playbook dir) does not take
    from the inventory's file."""
    shadow = load_plugin(REPO / "roles" / "preflight" / "filter_plugins" / "shadowed_vars.py")
    playbooks = tmp_path / "checkout"
    (playbooks / "group_vars").mkdir(parents=True)
    (playbooks / "group_vars" / "all.yml").write_text("port: 65432\nbackend: tmux\n")
    (playbooks / "group_vars" / "pis.yml").write_text("index_url: cpu\n")
    cluster = playbooks / "inventory" / "mine"
    (cluster / "group_vars").mkdir(parents=True)
    (cluster / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {
        "macs": {"hosts": {"mini1": {}}}, "pis": {"hosts": {"pi4": {}}},
    }}}))  # fmt: skip
    (cluster / "group_vars" / "all.yml").write_text("port: 7000\n")
    (cluster / "group_vars" / "pis.yml").write_text("index_url: mirror\n")
    (cluster / "group_vars" / "macs.yml").write_text("backend: launchd\n")
    groups = {"all": ["mini1", "pi4"], "macs": ["mini1"], "pis": ["pi4"]}
    errors = shadow.shadowed_errors([str(cluster / "hosts.yml")], str(playbooks), groups)
    assert [e.split(" (Ansible")[0] for e in errors] == [
        f"{cluster}/group_vars/all.yml sets port for group all, but group_vars/all.yml sets it "
        "for group all and wins on mini1, pi4",
        f"{cluster}/group_vars/pis.yml sets index_url for group pis, but group_vars/pis.yml "
        "sets it for group pis and wins on pi4",
    ]
    # What Ansible itself resolves for each host, with the playbooks' group_vars/ in play.
    merged = {
        host: json.loads(subprocess.run(
            [str(BIN / "ansible-inventory"), "-i", str(cluster / "hosts.yml"),
             "--playbook-dir", str(playbooks), "--host", host],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout)
        for host in ("mini1", "pi4")
    }  # fmt: skip
    assert merged["mini1"]["port"] == merged["pi4"]["port"] == 65432  # shadowed: named
    assert merged["pi4"]["index_url"] == "cpu"  # shadowed: named
    assert merged["mini1"]["backend"] == "launchd"  # the inventory's wins: not named
