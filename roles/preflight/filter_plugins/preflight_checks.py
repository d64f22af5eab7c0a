"""Pure checks for preflight: architecture, cluster subnets against the host's own networks,
and the configured cluster devices. Each problem is one line: host, what is wrong, the fix.

The tasks read the host (facts, `ip -j`, `netstat -rn`, `networksetup -list...`) read-only and
hand the output here; tests/test_preflight_checks.py feeds the same shapes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

SUPPORTED = ("aarch64", "arm64", "x86_64")
THIRTY_TWO_BIT = ("armv7l", "armv6l", "armhf", "armel", "i386", "i486", "i586", "i686")
Net = ipaddress.IPv4Network


def arch_error(host: str, architecture: str, userspace_bits: str | int = "64") -> str:
    """'' when torch can be installed here, else one sentence."""
    arch = str(architecture)
    if arch in THIRTY_TWO_BIT or str(userspace_bits) == "32":
        shown = arch if arch in THIRTY_TWO_BIT else f"{arch} kernel, 32-bit userland"
        return (
            f"{host}: a 32-bit OS ({shown}): torch has no 32-bit wheels, so a 64-bit OS is "
            "needed (on a Raspberry Pi: the 64-bit Raspberry Pi OS, dpkg arch arm64); or remove "
            f"{host} from the workers group"
        )
    if arch not in SUPPORTED:
        return (
            f"{host}: architecture {arch} is not supported (only {', '.join(SUPPORTED)}); "
            f"remove {host} from the workers group"
        )
    return ""


def _net(text: str) -> Net | None:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        return None


def linux_routes(route_json: list[Mapping[str, Any]]) -> list[dict[str, str]]:
    """`ip -j -4 route show table all` -> unicast routes as {dst (CIDR), dev, table}."""
    routes = []
    for r in route_json:
        if r.get("type", "unicast") != "unicast" or r.get("dst") in (None, "default"):
            continue
        net = _net(str(r["dst"]))
        if net is not None:
            routes.append({"dst": str(net), "dev": str(r.get("dev", "")),
                           "table": str(r.get("table", "main"))})  # fmt: skip
    return routes


_DARWIN_DST = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){0,3})(?:/(\d{1,2}))?$")


def darwin_routes(netstat_text: str) -> list[dict[str, str]]:
    """`netstat -rn -f inet` -> routes as {dst (CIDR), dev}. macOS drops trailing zero octets
    ("192.168.1" is 192.168.1.0/24, "10.8/16" is 10.8.0.0/16); an H flag marks a host route."""
    routes = []
    for line in netstat_text.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        match = _DARWIN_DST.match(cols[0])
        if not match:  # header lines, "default", link-layer entries
            continue
        octets = match.group(1).split(".")
        flags = cols[2]
        if match.group(2) is not None:
            prefix = int(match.group(2))
        elif "H" in flags:
            prefix = 32
        else:
            prefix = 8 * len(octets)
        addr = ".".join(octets + ["0"] * (4 - len(octets)))
        net = _net(f"{addr}/{prefix}")
        if net is not None:
            routes.append({"dst": str(net), "dev": cols[3], "table": "main"})
    return routes


def darwin_service_devices(service_order_text: str) -> dict[str, str]:
    """`networksetup -listnetworkserviceorder` -> {service: device ('' if none)}."""
    services: dict[str, str] = {}
    current = None
    for line in service_order_text.splitlines():
        head = re.match(r"^\((\d+|\*)\)\s+(.*)$", line.strip())
        if head:
            current = head.group(2).strip()
            services[current] = ""
            continue
        port = re.search(r"Device:\s*([^)\s]*)\)", line)
        if current is not None and port:
            services[current] = port.group(1)
    return services


def darwin_hardware_ports(hardware_ports_text: str) -> dict[str, str]:
    """`networksetup -listallhardwareports` -> {hardware port: device}."""
    ports: dict[str, str] = {}
    port = None
    for line in hardware_ports_text.splitlines():
        if line.startswith("Hardware Port:"):
            port = line.partition(":")[2].strip()
            ports[port] = ""
        elif line.startswith("Device:") and port is not None:
            ports[port] = line.partition(":")[2].strip()
    return ports


def cluster_subnets(
    interfaces: Iterable[Mapping[str, Any]], routes: Iterable[Mapping[str, Any]]
) -> list[tuple[Net, str]]:
    """(network, what it is) for every cluster link subnet and cluster route destination."""
    found = []
    for iface in interfaces:
        net = _net(f"{iface.get('address')}/{iface.get('prefix')}")
        if net is not None:
            found.append((net, f"link {iface.get('link')}"))
    for route in routes:
        net = _net(str(route.get("to")))
        if net is not None:
            found.append((net, f"route to {route.get('to')} via {route.get('via')}"))
    return found


def subnet_errors(
    host: str,
    interfaces: list[Mapping[str, Any]],
    routes: list[Mapping[str, Any]],
    observed: list[Mapping[str, str]],
    cluster_devices: Iterable[str],
) -> list[str]:
    """A cluster subnet that overlaps one of the host's own networks (its Wi-Fi/LAN subnet, a
    VPN route) on a device that is not a cluster device: traffic would go the wrong way."""
    ours = set(cluster_devices) | {"lo", "lo0"}
    errors = []
    for net, what in cluster_subnets(interfaces, routes):
        widest: dict[str, Net] = {}  # per device, one line: its widest overlapping route
        for route in observed:
            other = _net(route["dst"])
            if route["dev"] in ours or other is None or other.prefixlen == 0:
                continue
            if net.overlaps(other) and (
                route["dev"] not in widest or other.prefixlen < widest[route["dev"]].prefixlen
            ):
                widest[route["dev"]] = other
        for dev, other in widest.items():
            errors.append(
                f"{host}: cluster {what} ({net}) overlaps {other} on {dev} "
                "(this host's own Wi-Fi/LAN subnet or a VPN route, e.g. a router's factory "
                "192.168.50.0/24); pick a cluster subnet no home network or VPN uses and change "
                "it in the inventory (cluster_interfaces / cluster_routes of every host on it)"
            )
    return errors


def device_errors(
    host: str,
    system: str,
    interfaces: list[Mapping[str, Any]],
    linux_devices: Iterable[str] = (),
    darwin_services: Mapping[str, str] | None = None,
    darwin_ports: Mapping[str, str] | None = None,
    thunderbolt_mode: str = "bridge",
) -> list[str]:
    """Each configured linux_device / macos_service (or p2p hardware port) must exist."""
    errors = []
    if system == "Linux":
        have = sorted(set(linux_devices))
        for iface in interfaces:
            dev = iface.get("linux_device")
            if dev and dev not in have:
                errors.append(
                    f"{host}: linux_device {dev} of link {iface.get('link')} does not exist "
                    f"(this host has {', '.join(have)}); fix linux_device in the inventory or "
                    "plug in the adapter"
                )
    elif system == "Darwin":
        services = dict(darwin_services or {})
        ports = dict(darwin_ports or {})
        for iface in interfaces:
            svc = iface.get("macos_service")
            if not svc:
                continue
            if thunderbolt_mode == "p2p" and svc not in services:
                port = iface.get("macos_hardware_port") or svc
                if port not in ports:
                    errors.append(
                        f"{host}: hardware port {port!r} of link {iface.get('link')} does not "
                        f"exist (this Mac has: {', '.join(ports)}); fix macos_hardware_port"
                    )
            elif svc not in services:
                errors.append(
                    f"{host}: macos_service {svc!r} of link {iface.get('link')} does not exist "
                    f"(this Mac has: {', '.join(services)}); fix macos_service in the inventory "
                    "(networksetup -listallnetworkservices)"
                )
    return errors


def darwin_cluster_devices(
    interfaces: Iterable[Mapping[str, Any]],
    services: Mapping[str, str],
    ports: Mapping[str, str] | None = None,
) -> list[str]:
    """The devices behind the cluster links, named by service or by hardware port (their
    addresses and routes are ours: after site.yml they are no collision)."""
    devices = []
    for iface in interfaces:
        if iface.get("macos_service"):
            devices.append(services.get(iface["macos_service"], ""))
        elif iface.get("macos_hardware_port"):
            devices.append((ports or {}).get(iface["macos_hardware_port"], ""))
    return [d for d in devices if d]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "preflight_arch_error": arch_error,
            "preflight_linux_routes": linux_routes,
            "preflight_darwin_routes": darwin_routes,
            "preflight_darwin_service_devices": darwin_service_devices,
            "preflight_darwin_hardware_ports": darwin_hardware_ports,
            "preflight_darwin_cluster_devices": darwin_cluster_devices,
            "preflight_subnet_errors": subnet_errors,
            "preflight_device_errors": device_errors,
        }
