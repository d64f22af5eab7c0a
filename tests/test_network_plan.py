"""The network role's pure planning filters, on `ip -j` shaped input."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ansible_helpers import load_plugin

PLUGIN = Path(__file__).resolve().parents[1] / "roles/network/filter_plugins/network_plan.py"
plan = load_plugin(PLUGIN)

PI4_IFACES = [{"link": "edge51", "address": "192.168.51.4", "prefix": 24, "linux_device": "eth0"}]
PI4_ROUTES = [{"to": "10.10.0.0/24", "via": "192.168.51.2"}]


def link(dev: str, up: bool, *cidrs: str) -> dict:
    info = [
        {"family": "inet", "local": c.split("/")[0], "prefixlen": int(c.split("/")[1])}
        for c in cidrs
    ]
    return {"ifname": dev, "flags": ["BROADCAST", "UP"] if up else ["BROADCAST"], "addr_info": info}


def test_bare_pi_gets_link_address_and_route() -> None:
    cmds = plan.linux_ip_plan([link("eth0", False)], [], PI4_IFACES, PI4_ROUTES)
    assert [c["argv"] for c in cmds] == [
        ["ip", "link", "set", "dev", "eth0", "up"],
        ["ip", "addr", "replace", "192.168.51.4/24", "dev", "eth0"],
        ["ip", "route", "replace", "10.10.0.0/24", "via", "192.168.51.2", "dev", "eth0"],
    ]


def test_configured_pi_plans_nothing_and_restore_undoes_it() -> None:
    addrs = [link("eth0", True, "192.168.51.4/24")]
    routes = [
        {"dst": "10.10.0.0/24", "gateway": "192.168.51.2", "dev": "eth0"},
        {"dst": "default", "gateway": "172.27.83.1", "dev": "wlan0"},
    ]
    assert plan.linux_ip_plan(addrs, routes, PI4_IFACES, PI4_ROUTES) == []
    undo = plan.linux_ip_restore_plan(addrs, routes, PI4_IFACES, PI4_ROUTES)
    assert [c["argv"] for c in undo] == [
        ["ip", "route", "del", "10.10.0.0/24", "via", "192.168.51.2"],
        ["ip", "addr", "del", "192.168.51.4/24", "dev", "eth0"],
    ]


def test_missing_device_is_named() -> None:
    with pytest.raises(Exception, match="device eth0 does not exist"):
        plan.linux_ip_plan([link("wlan0", True)], [], PI4_IFACES, PI4_ROUTES)


def test_validation_names_each_problem() -> None:
    bad = plan.validation_errors(
        [*PI4_IFACES, {**PI4_IFACES[0], "address": "192.168.51.5"}],
        [{"to": "0.0.0.0/0", "via": "192.168.51.2"}, {"to": "10.9.0.0/24", "via": "10.1.1.1"}],
    )
    assert any("network_interfaces[1]" in e and "listed twice" in e for e in bad)
    assert any("network_routes[0]" in e and "default route" in e for e in bad)
    assert any("network_routes[1]" in e and "10.1.1.1" in e for e in bad)


def test_verify_targets_follow_links_and_isolation() -> None:
    hostvars = {
        "mini1": {
            "cluster_interfaces": [
                {"link": "fabric", "address": "10.10.0.1", "prefix": 24},
                {"link": "edge50", "address": "192.168.50.1", "prefix": 24},
            ]
        },
        "mini3": {
            "cluster_interfaces": [
                {"link": "fabric", "address": "10.10.0.3", "prefix": 24},
                {"link": "edge51", "address": "192.168.51.2", "prefix": 24},
            ]
        },
        "pi4": {"cluster_interfaces": PI4_IFACES, "cluster_routes": PI4_ROUTES},
        "pi5": {
            "cluster_interfaces": [{"link": "edge50", "address": "192.168.50.2", "prefix": 24}],
            "cluster_routes": [{"to": "10.10.0.0/24", "via": "192.168.50.1"}],
        },
    }
    hosts = list(hostvars)
    pi4 = plan.verify_targets(hostvars, "pi4", hosts, ["mini1"], ["pi4", "pi5"])
    assert pi4 == {
        "reach": ["192.168.51.2", "10.10.0.1"],
        "unreachable": ["192.168.50.2", "192.168.50.1"],
    }
    mini1 = plan.verify_targets(hostvars, "mini1", hosts, ["mini1"], ["pi4", "pi5"])
    assert mini1 == {"reach": ["10.10.0.3", "192.168.50.2"], "unreachable": []}


# ---------------------------------------------------------------- NetworkManager (F12)

NM_LIST = "\n".join(
    [
        "0b1c:802-3-ethernet:-999:Wired connection 1",
        "7e2a:802-3-ethernet:0:netplan-eth0",
        "9f00:802-3-ethernet:50:office\\:usb",  # a colon in a name is escaped
        "aa11:802-11-wireless:0:home-wifi",
        "cc22:802-3-ethernet:120:smolcluster-edge51",  # ours: never a rival
    ]
)


def details(profiles: list[dict], devices: dict[str, str]) -> list[dict]:
    """Loop results as `nmcli -t -f connection.interface-name,... connection show` gives them."""
    return [
        {
            "item": p,
            "stdout": f"connection.interface-name:{devices.get(p['uuid'], '')}\n"
            f"connection.autoconnect-priority:{p['priority']}",
        }
        for p in profiles
    ]


def test_nmcli_profiles_are_parsed_with_escaped_colons() -> None:
    profiles = plan.nmcli_parse_profiles(NM_LIST)
    assert [p["name"] for p in profiles][2] == "office:usb"
    assert [(p["uuid"], p["priority"]) for p in profiles][:3] == [
        ("0b1c", -999),
        ("7e2a", 0),
        ("9f00", 50),
    ]


def test_nmcli_priority_is_above_every_rival_on_the_device() -> None:
    ether = [p for p in plan.nmcli_parse_profiles(NM_LIST) if p["type"] == "802-3-ethernet"]
    # office:usb is bound to another device; netplan-eth0 to eth0; Wired connection 1 to none.
    bound = {"0b1c": "", "7e2a": "eth0", "9f00": "eth1", "cc22": "eth0"}
    profiles = plan.nmcli_profile_details(details(ether, bound))
    assert plan.nmcli_priority(profiles, "eth0", "smolcluster-", 100) == 100
    # A rival at or above the floor is beaten by one.
    assert plan.nmcli_priority(profiles, "eth1", "smolcluster-", 10) == 51
    assert plan.nmcli_priority(profiles, "eth1", "smolcluster-", 0) == 51
    rival = [{**profiles[1], "priority": 999}]
    assert plan.nmcli_priority(rival, "eth0", "smolcluster-", 100) == 999  # NM's maximum


def test_nmcli_active_profiles_leave_ours_out() -> None:
    active = "\n".join(
        ["7e2a:eth0:netplan-eth0", "aa11:wlan0:home-wifi", "cc22:eth1:smolcluster-edge50"]
    )
    assert plan.nmcli_active_by_device(active, "smolcluster-", ["eth0", "eth1"]) == {"eth0": "7e2a"}
