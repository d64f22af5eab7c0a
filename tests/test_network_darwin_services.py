"""macOS links by service or hardware port, checked against the Mac's own lists (F11)."""

from __future__ import annotations

from pathlib import Path

from tests.ansible_helpers import load_plugin
from tests.fake_macos import mac_mini, networksetup

PLUGIN = Path(__file__).resolve().parents[1] / "roles/network/filter_plugins/network_plan.py"
plan = load_plugin(PLUGIN)


def observed(**state: object) -> dict[str, str]:
    """What darwin_observe.yml reads, from the fake Mac's networksetup."""
    mac = mac_mini(**state)
    return {
        "services_list": networksetup(mac, ["-listallnetworkservices"]),
        "hardware_ports": networksetup(mac, ["-listallhardwareports"]),
        "service_order": networksetup(mac, ["-listnetworkserviceorder"]),
    }


def link(**keys: str) -> dict[str, object]:
    return {"link": "edge50", "address": "192.168.50.1", "prefix": 24, **keys}


def test_parsers_read_what_networksetup_prints() -> None:
    seen = observed()
    assert plan.parse_hardware_ports(seen["hardware_ports"])["USB 10/100/1000 LAN"] == "en5"
    order = plan.parse_service_order(seen["service_order"])
    assert order["Ethernet"] == "Ethernet" and order["Thunderbolt Bridge"] == "Thunderbolt Bridge"


def test_a_hardware_port_names_its_service() -> None:
    mac = mac_mini()
    mac["services"][2]["name"] = "AX88179A"  # a dongle listed under its chip's name
    seen = {
        "services_list": networksetup(mac, ["-listallnetworkservices"]),
        "hardware_ports": networksetup(mac, ["-listallhardwareports"]),
        "service_order": networksetup(mac, ["-listnetworkserviceorder"]),
    }
    got = plan.darwin_interfaces(seen, [link(macos_hardware_port="USB 10/100/1000 LAN")])
    assert got["errors"] == []
    assert got["interfaces"][0]["macos_service"] == "AX88179A"


def test_a_missing_service_fails_naming_what_the_mac_has() -> None:
    got = plan.darwin_interfaces(observed(), [link(macos_service="Ethernet 2")])
    assert got["interfaces"] == []
    (error,) = got["errors"]
    assert error.startswith("edge50: macos_service 'Ethernet 2' not found; this Mac has services: ")
    assert "Ethernet, Wi-Fi, USB 10/100/1000 LAN, Thunderbolt Bridge" in error


def test_a_missing_hardware_port_fails() -> None:
    got = plan.darwin_interfaces(observed(), [link(macos_hardware_port="Thunderbolt 9")], "p2p")
    assert "macos_hardware_port 'Thunderbolt 9' not found" in got["errors"][0]


def test_p2p_may_name_a_port_without_a_service_yet() -> None:
    got = plan.darwin_interfaces(observed(), [link(macos_hardware_port="Thunderbolt 1")], "p2p")
    assert got == {"interfaces": [link(macos_hardware_port="Thunderbolt 1",
                                       macos_service="Thunderbolt 1")], "errors": []}  # fmt: skip
    bridge = plan.darwin_interfaces(observed(), [link(macos_hardware_port="Thunderbolt 1")])
    assert bridge["errors"], "bridge mode creates no services"


def test_a_route_on_an_unknown_service_fails() -> None:
    route = {"to": "192.168.51.0/24", "via": "192.168.50.2", "macos_service": "Thunderbolt Brige"}
    got = plan.darwin_interfaces(observed(), [link(macos_service="Ethernet")], routes=[route])
    assert got["errors"] == [
        "route to 192.168.51.0/24: macos_service 'Thunderbolt Brige' not found; "
        "this Mac has services: Ethernet, Wi-Fi, USB 10/100/1000 LAN, Thunderbolt Bridge; "
        "hardware ports: Ethernet, Wi-Fi, Thunderbolt 1, Thunderbolt 2, USB 10/100/1000 LAN, "
        "Thunderbolt Bridge"
    ]
