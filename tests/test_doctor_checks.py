"""doctor.yml's pure checks (roles/preflight/filter_plugins/doctor_checks.py), fed the shapes the
tasks read from a host: `ip -j -4 addr show`, `ip -j -4 route get`, macOS `route -n get`."""

from __future__ import annotations

import json

from tests.ansible_helpers import REPO, load_plugin

checks = load_plugin(REPO / "roles" / "preflight" / "filter_plugins" / "doctor_checks.py")
PI4 = [{"link": "edge51", "address": "192.168.51.4", "prefix": 24, "linux_device": "eth0"}]
PI4_ROUTES = [{"to": "10.10.0.0/24", "via": "192.168.51.2"}]


def addr(dev: str, *cidrs: str) -> dict:
    return {"ifname": dev, "addr_info": [
        {"local": c.split("/")[0], "prefixlen": int(c.split("/")[1])} for c in cidrs]}  # fmt: skip


def test_an_address_missing_from_its_device_is_named() -> None:
    assert checks.linux_address_errors("pi4", PI4, [addr("eth0", "192.168.51.4/24")]) == []
    errors = checks.linux_address_errors(
        "pi4", PI4, [addr("eth0"), addr("wlan0", "172.27.83.14/24")]
    )
    assert errors == [
        "pi4: eth0 (link edge51) does not hold 192.168.51.4/24 (it has: no IPv4 address); fix: "
        "run site.yml (network role), and check the cable is plugged in"
    ]


def test_darwin_address_from_getinfo() -> None:
    mac = [{"link": "fabric", "address": "10.10.0.2", "macos_service": "Thunderbolt Bridge"}]
    ok = {"Thunderbolt Bridge": "Manual Configuration\nIP address: 10.10.0.2\nSubnet mask: x\n"}
    assert checks.darwin_address_errors("mini2", mac, ok) == []
    dhcp = {"Thunderbolt Bridge": "DHCP Configuration\nIP address: 169.254.3.1\n"}
    assert (
        "has IP address 169.254.3.1, not 10.10.0.2"
        in checks.darwin_address_errors("mini2", mac, dhcp)[0]
    )


def test_route_targets_are_each_route_and_the_dialled_server() -> None:
    targets = checks.route_targets(PI4, PI4_ROUTES, "10.10.0.1")
    assert targets == [{"address": "10.10.0.1", "via": "192.168.51.2", "to": "10.10.0.0/24"}]
    # A host with no cluster links dials over the LAN: nothing to look up.
    assert checks.route_targets([], [], "172.27.83.11") == []
    mini3 = [{"link": "fabric", "address": "10.10.0.3", "linux_device": "tb0"}]
    assert checks.route_targets(mini3, [], "10.10.0.1") == [
        {"address": "10.10.0.1", "via": "", "to": ""}
    ]


def route_get(**found: str) -> dict:
    return {"rc": 0, "stdout": json.dumps([found]), "stderr": ""}


def test_a_missing_route_that_falls_back_to_the_wifi_is_named() -> None:
    target = checks.route_targets(PI4, PI4_ROUTES, "10.10.0.1")[0]
    good = route_get(dst="10.10.0.1", gateway="192.168.51.2", dev="eth0")
    assert checks.route_error("pi4", "Linux", target, good, ["eth0"]) == ""
    wifi = route_get(dst="10.10.0.1", gateway="172.27.83.1", dev="wlan0")
    assert checks.route_error("pi4", "Linux", target, wifi, ["eth0"]) == (
        "pi4: 10.10.0.0/24 should be routed via 192.168.51.2, but 10.10.0.1 goes via "
        "172.27.83.1 dev wlan0: the cluster route is missing; fix: run site.yml (network role)"
    )
    none = {"rc": 2, "stdout": "", "stderr": "RTNETLINK answers: Network is unreachable"}
    assert "no route to 10.10.0.1 (RTNETLINK answers: Network is unreachable)" in (
        checks.route_error("pi4", "Linux", target, none, ["eth0"])
    )


def test_the_dialled_server_must_leave_by_a_cluster_link() -> None:
    target = {"address": "10.10.0.1", "via": "", "to": ""}
    on_link = route_get(dst="10.10.0.1", dev="tb0")
    assert checks.route_error("mini2", "Linux", target, on_link, ["tb0"]) == ""
    assert "goes via 172.27.83.1 dev wlan0, not over a cluster link (tb0)" in checks.route_error(
        "mini2", "Linux", target, route_get(gateway="172.27.83.1", dev="wlan0"), ["tb0"]
    )


def test_macos_route_get_is_read_for_gateway_and_interface() -> None:
    out = (
        "   route to: 10.10.0.1\ndestination: 10.10.0.0\n       mask: 255.255.255.0\n"
        "    gateway: 10.10.0.3\n  interface: bridge0\n      flags: <UP,GATEWAY,DONE>\n"
    )
    target = {"address": "192.168.51.1", "via": "10.10.0.3", "to": "192.168.51.0/24"}
    assert checks.route_error("mini1", "Darwin", target, {"rc": 0, "stdout": out}, []) == ""


def test_failure_line_is_the_rung_and_one_line() -> None:
    result = {"msg": "Task failed: pi4: no venv at /x\n  fix: run site.yml", "rc": None}
    assert checks.failure_line("torch", result) == "torch: pi4: no venv at /x fix: run site.yml"
    hv = {"mini1": {}, "pi4": {"preflight__doctor_red": "routes: pi4: ..."}}
    assert checks.lines(hv, ["mini1", "pi4"]) == ["mini1: ok", "pi4: routes: pi4: ..."]


def test_a_failed_loop_is_the_line_of_its_failed_items() -> None:
    loop = {"msg": "One or more items failed", "results": [
        {"item": "network", "failed": False, "msg": "The arg spec validation passed"},
        {"item": "trainer", "failed": True, "msg": "argument 'trainer_batch_size' is of type str"},
    ]}  # fmt: skip
    assert checks.failure_line("variables", loop) == (
        "variables: argument 'trainer_batch_size' is of type str"
    )
