"""The network role's pure planning filters, on `ip -j` shaped input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[1] / "roles/network/filter_plugins/network_plan.py"
_spec = importlib.util.spec_from_file_location("network_plan", PLUGIN)
assert _spec and _spec.loader
plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan)

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
