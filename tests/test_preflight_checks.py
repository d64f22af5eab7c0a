"""Preflight's architecture, subnet-overlap, device and sudo checks (F13, F14, F1's password).

The pure logic gets the shapes the hosts print; then preflight runs for real against this
machine (local connection, read-only: `ip -j` routes and links, one `become` attempt that must
fail because become_exe does not exist). Nothing here changes this machine's network.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from tests.ansible_helpers import REPO, load_plugin, local_inventory, preflight, recap, show

PLUGIN = REPO / "roles/preflight/filter_plugins/preflight_checks.py"
checks = load_plugin(PLUGIN)

EDGE50 = [{"link": "edge50", "address": "192.168.50.1", "prefix": 24, "linux_device": "eth1"}]
FABRIC_ROUTE = [{"to": "10.10.0.0/24", "via": "192.168.50.1"}]


@pytest.mark.parametrize(
    ("arch", "bits", "expect"),
    [
        ("aarch64", "64", ""),
        ("arm64", "64", ""),
        ("x86_64", "64", ""),
        ("armv7l", "32", "pi4: a 32-bit OS (armv7l)"),
        ("aarch64", "32", "pi4: a 32-bit OS (aarch64 kernel, 32-bit userland)"),
        ("i386", "32", "pi4: a 32-bit OS"),
        ("riscv64", "64", "pi4: architecture riscv64 is not supported"),
    ],
)
def test_arch(arch: str, bits: str, expect: str) -> None:
    msg = checks.arch_error("pi4", arch, bits)
    assert msg.startswith(expect) if expect else msg == ""
    if "32-bit" in expect:
        assert "64-bit OS is needed" in msg and "\n" not in msg


def test_linux_routes_keep_unicast_of_every_table() -> None:
    route_json = [
        {"dst": "default", "gateway": "192.168.50.254", "dev": "wlan0"},
        {"dst": "192.168.50.0/24", "dev": "wlan0", "protocol": "kernel"},
        {"dst": "10.0.0.0/8", "dev": "tun0"},  # a split-tunnel VPN
        {"dst": "100.64.0.0/10", "dev": "tailscale0", "table": "52"},
        {"type": "local", "dst": "192.168.50.7", "dev": "wlan0", "table": "local"},
        {"type": "broadcast", "dst": "192.168.50.255", "dev": "wlan0", "table": "local"},
    ]
    assert checks.linux_routes(route_json) == [
        {"dst": "192.168.50.0/24", "dev": "wlan0", "table": "main"},
        {"dst": "10.0.0.0/8", "dev": "tun0", "table": "main"},
        {"dst": "100.64.0.0/10", "dev": "tailscale0", "table": "52"},
    ]


NETSTAT = """Routing tables

Internet:
Destination        Gateway            Flags               Netif Expire
default            192.168.50.1       UGScg                 en0
10.8/16            utun4              USc                 utun4
127                127.0.0.1          UCS                   lo0
127.0.0.1          127.0.0.1          UH                    lo0
169.254            link#6             UCS                   en0      !
192.168.50         link#6             UCS                   en0      !
192.168.50.1/32    link#6             UCS                   en0      !
192.168.50.1       a0:36:bc:1:2:3     UHLWIir               en0   1188
192.168.50.23/32   link#6             UCS                   en0      !
224.0.0/4          link#6             UmCS                  en0      !
"""


def test_darwin_routes_expand_short_destinations() -> None:
    routes = {(r["dst"], r["dev"]) for r in checks.darwin_routes(NETSTAT)}
    assert ("10.8.0.0/16", "utun4") in routes
    assert ("192.168.50.0/24", "en0") in routes
    assert ("192.168.50.1/32", "en0") in routes  # H flag: a host route
    assert ("127.0.0.0/8", "lo0") in routes
    assert not any(dst.startswith("0.0.0.0") for dst, _ in routes)  # default is left out


def test_darwin_services_map_to_devices() -> None:
    order = """An asterisk (*) denotes that a network service is disabled.
(1) Wi-Fi
(Hardware Port: Wi-Fi, Device: en0)

(2) Thunderbolt Bridge
(Hardware Port: Thunderbolt Bridge, Device: bridge0)

(*) USB 10/100/1000 LAN
(Hardware Port: USB 10/100/1000 LAN, Device: en7)
"""
    services = checks.darwin_service_devices(order)
    assert services == {
        "Wi-Fi": "en0",
        "Thunderbolt Bridge": "bridge0",
        "USB 10/100/1000 LAN": "en7",
    }
    ports = checks.darwin_hardware_ports(
        "Hardware Port: Ethernet\nDevice: en0\nEthernet Address: 1\n\n"
        "Hardware Port: Thunderbolt 1\nDevice: en1\n"
    )
    assert ports == {"Ethernet": "en0", "Thunderbolt 1": "en1"}
    mac = [{"link": "edge50", "address": "192.168.50.1", "prefix": 24, "macos_service": "Ethernet"}]
    errors = checks.device_errors("mini1", "Darwin", mac, darwin_services=services)
    assert errors == [
        "mini1: macos_service 'Ethernet' of link edge50 does not exist (this Mac has: Wi-Fi, "
        "Thunderbolt Bridge, USB 10/100/1000 LAN); fix macos_service in the inventory "
        "(networksetup -listallnetworkservices)"
    ]
    p2p = [{**mac[0], "macos_service": "Thunderbolt 1"}]
    assert checks.device_errors("mini1", "Darwin", p2p, [], services, ports, "p2p") == []


def test_home_lan_on_the_edge_subnet_is_named() -> None:
    # An ASUS router's factory LAN is 192.168.50.0/24: mini1's Wi-Fi sits in it.
    observed = checks.darwin_routes(NETSTAT)
    errors = checks.subnet_errors("mini1", EDGE50, [], observed, ["en7"])
    assert len(errors) == 1  # the /24 and mini1's own /32s on en0: one line for en0
    assert errors[0].startswith(
        "mini1: cluster link edge50 (192.168.50.0/24) overlaps 192.168.50.0/24 on en0"
    )
    assert "change it in the inventory" in errors[0]


def test_a_link_named_by_hardware_port_is_a_cluster_device() -> None:
    """After site.yml the dongle (named by hardware port) holds the edge subnet: not a collision."""
    mac = [
        {"link": "fabric", "address": "10.10.0.1", "prefix": 24,
         "macos_service": "Thunderbolt Bridge"},
        {"link": "edge50", "address": "192.168.50.1", "prefix": 24,
         "macos_hardware_port": "USB 10/100/1000 LAN"},
    ]  # fmt: skip
    services = {"Thunderbolt Bridge": "bridge0", "USB 10/100/1000 LAN": "en5"}
    ports = {"Thunderbolt Bridge": "bridge0", "USB 10/100/1000 LAN": "en5", "Wi-Fi": "en1"}
    devices = checks.darwin_cluster_devices(mac, services, ports)
    assert devices == ["bridge0", "en5"]
    observed = [{"dst": "192.168.50.0/24", "dev": "en5", "table": "main"}]
    assert checks.subnet_errors("mini1", mac, [], observed, devices) == []


def test_vpn_route_and_cluster_routes_are_checked_but_own_devices_are_not() -> None:
    observed = checks.linux_routes(
        [
            {"dst": "192.168.1.0/24", "dev": "wlan0"},
            {"dst": "10.0.0.0/8", "dev": "tun0"},
            # the host's own cluster link and route (a second site.yml): never a conflict
            {"dst": "192.168.50.0/24", "dev": "eth1"},
            {"dst": "10.10.0.0/24", "dev": "eth1", "gateway": "192.168.50.1"},
        ]
    )
    errors = checks.subnet_errors("pi5", EDGE50, FABRIC_ROUTE, observed, ["eth1"])
    assert errors == [
        "pi5: cluster route to 10.10.0.0/24 via 192.168.50.1 (10.10.0.0/24) overlaps 10.0.0.0/8 "
        "on tun0 (this host's own Wi-Fi/LAN subnet or a VPN route, e.g. a router's factory "
        "192.168.50.0/24); pick a cluster subnet no home network or VPN uses and change it in "
        "the inventory (cluster_interfaces / cluster_routes of every host on it)"
    ]
    assert checks.device_errors("pi5", "Linux", EDGE50, ["lo", "eth0", "wlan0"]) == [
        "pi5: linux_device eth1 of link edge50 does not exist (this host has eth0, lo, wlan0); "
        "fix linux_device in the inventory or plug in the adapter"
    ]


# ---------------------------------------------------------------- for real, against localhost


def _this_machines_lan() -> dict | None:
    """A subnet this machine really has on a real device (read-only `ip -j`)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "main"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        return None
    for route in checks.linux_routes(json.loads(out.stdout or "[]")):
        if route["dev"] != "lo" and 8 <= int(route["dst"].split("/")[1]) <= 30:
            return route
    return None


def _run_preflight(tmp_path: Path, workers: dict[str, dict]) -> subprocess.CompletedProcess[str]:
    return preflight(local_inventory(tmp_path, ["mini1"], workers))


def test_overlap_and_missing_device_fail_for_real(tmp_path: Path) -> None:
    lan = _this_machines_lan()
    if lan is None:
        pytest.skip("this machine has no LAN route to overlap")
    net = lan["dst"]
    inside = str(next(iter(ipaddress.ip_network(net).hosts())))
    result = _run_preflight(
        tmp_path,
        {
            # A cluster link inside this machine's real LAN, on a device that does not exist.
            "pi5": {
                "cluster_dial_address": "127.0.0.1",
                "preflight_check_become": False,
                "cluster_interfaces": [
                    {
                        "link": "edge50",
                        "address": inside,
                        "prefix": int(net.split("/")[1]),
                        "linux_device": "scl-nodev0",
                    }
                ],
            },
            # A host with a free subnet on an existing device passes.
            "pi4": {
                "cluster_dial_address": "127.0.0.1",
                "preflight_check_become": False,
                "cluster_interfaces": [
                    {
                        "link": "edge51",
                        "address": "10.254.254.1",
                        "prefix": 30,
                        "linux_device": "lo",
                    }
                ],
            },
        },
    )
    assert result.returncode != 0, show(result)
    assert "pi5: linux_device scl-nodev0 of link edge50 does not exist" in result.stdout, show(
        result
    )
    assert f"pi5: cluster link edge50 ({net}) overlaps {net} on {lan['dev']}" in result.stdout
    counts = recap(result.stdout)
    assert counts["pi5"]["failed"] == 1 and counts["pi4"]["failed"] == 0, show(result)


def test_become_that_does_not_work_fails_in_preflight_naming_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root here: Ansible skips become to the same user unless told not to; then the become
    # really runs, through a become_exe that does not exist (as when sudo is missing).
    monkeypatch.setenv("ANSIBLE_BECOME_ALLOW_SAME_USER", "True")
    result = _run_preflight(
        tmp_path,
        {
            "mini3": {
                "cluster_dial_address": "127.0.0.1",
                "cluster_forwarding": True,  # the network role has work here, so needs sudo
                "ansible_become_exe": str(tmp_path / "no-sudo-here"),
            },
            "macbook": {"cluster_dial_address": "127.0.0.1", "cluster_interfaces": []},
        },
    )
    assert result.returncode != 0, show(result)
    line = next(ln for ln in result.stdout.splitlines() if "become (sudo) does not work" in ln)
    assert "mini3: become (sudo) does not work" in line and "-K" in line, show(result)
    counts = recap(result.stdout)
    # The MacBook has nothing for the network role, so no sudo is tried there.
    assert counts["mini3"]["failed"] == 1 and counts["macbook"]["failed"] == 0, show(result)
    assert "TASK [preflight : Check the cluster devices" not in result.stdout.split(line)[-1]
