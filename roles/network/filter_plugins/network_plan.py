"""Pure planning for the network role: observed state + wanted state -> argv lists.

The role reads state on the host (ip -j ..., networksetup -get...), hands it to these filters and
runs only what they return, so a host already in the wanted state gets an empty plan (changed=0).
Being pure functions, the macOS plans can be checked on Linux against docs/network.md.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

Command = dict[str, Any]  # {"argv": [...], "why": "..."}
Triple = tuple[str, str, str]  # (destination, mask, gateway) as networksetup spells routes

_IPV4 = re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3})\b")


def _cmd(why: str, *argv: str) -> Command:
    return {"argv": [str(a) for a in argv], "why": why}


def prefix_to_mask(prefix: int | str) -> str:
    return str(ipaddress.IPv4Network(f"0.0.0.0/{int(prefix)}").netmask)


def iface_network(iface: Mapping[str, Any]) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Interface(f"{iface['address']}/{int(iface['prefix'])}").network


def route_interface(route: Mapping[str, Any], interfaces: Iterable[Mapping[str, Any]]) -> dict:
    """The interface whose subnet holds the route's gateway (the link the route leaves by)."""
    via = ipaddress.IPv4Address(route["via"])
    for iface in interfaces:
        if via in iface_network(iface):
            return dict(iface)
    raise AnsibleFilterError(
        f"network_routes: gateway {route['via']} of route to {route['to']} is on none of "
        "this host's network_interfaces"
    )


def validation_errors(
    interfaces: list[Mapping[str, Any]], routes: list[Mapping[str, Any]]
) -> list[str]:
    """Everything wrong with the wanted state, each message naming the variable and value."""
    errors: list[str] = []
    links: set[str] = set()
    for i, iface in enumerate(interfaces):
        name = f"network_interfaces[{i}]"
        try:
            ipaddress.IPv4Interface(f"{iface['address']}/{int(iface['prefix'])}")
        except (ValueError, KeyError, TypeError) as exc:
            errors.append(f"{name}: bad address/prefix: {exc}")
            continue
        if iface["link"] in links:
            errors.append(f"{name}: link {iface['link']!r} listed twice")
        links.add(iface["link"])
    for i, route in enumerate(routes):
        name = f"network_routes[{i}]"
        try:
            net = ipaddress.IPv4Network(str(route["to"]), strict=True)
            ipaddress.IPv4Address(route["via"])
        except (ValueError, KeyError, TypeError) as exc:
            errors.append(f"{name}: bad route: {exc}")
            continue
        if net.prefixlen == 0:
            errors.append(f"{name}: {route['to']} is a default route; this role never sets one")
            continue
        try:
            route_interface(route, [x for x in interfaces if "address" in x])
        except AnsibleFilterError as exc:
            errors.append(f"{name}: {exc}")
    return errors


# ---------------------------------------------------------------- Linux (iproute2)


def linux_ip_plan(
    addr_json: list[Mapping[str, Any]],
    route_json: list[Mapping[str, Any]],
    interfaces: list[Mapping[str, Any]],
    routes: list[Mapping[str, Any]],
) -> list[Command]:
    """Commands that bring links up, add addresses and routes; empty when all are in place."""
    devices = {d["ifname"]: d for d in addr_json}
    plan: list[Command] = []
    for iface in interfaces:
        dev = iface["linux_device"]
        if dev not in devices:
            raise AnsibleFilterError(f"network_interfaces: device {dev} does not exist on host")
        state = devices[dev]
        if "UP" not in state.get("flags", []):
            plan.append(_cmd(f"{dev} is down", "ip", "link", "set", "dev", dev, "up"))
        have = {
            (a.get("local"), int(a.get("prefixlen", -1)))
            for a in state.get("addr_info", [])
            if a.get("family") == "inet"
        }
        if (iface["address"], int(iface["prefix"])) not in have:
            cidr = f"{iface['address']}/{int(iface['prefix'])}"
            plan.append(_cmd(f"{dev} lacks {cidr}", "ip", "addr", "replace", cidr, "dev", dev))
    present = {(r.get("dst"), r.get("gateway")) for r in route_json}
    for route in routes:
        to = str(ipaddress.IPv4Network(str(route["to"])))
        if (to, route["via"]) not in present:
            dev = route_interface(route, interfaces)["linux_device"]
            plan.append(
                _cmd(
                    f"no route {to} via {route['via']}",
                    "ip",
                    "route",
                    "replace",
                    to,
                    "via",
                    route["via"],
                    "dev",
                    dev,
                )
            )
    return plan


def linux_ip_restore_plan(
    addr_json: list[Mapping[str, Any]],
    route_json: list[Mapping[str, Any]],
    interfaces: list[Mapping[str, Any]],
    routes: list[Mapping[str, Any]],
) -> list[Command]:
    """Commands that remove exactly the routes and addresses the role set, if still present."""
    plan: list[Command] = []
    present = {(r.get("dst"), r.get("gateway")) for r in route_json}
    for route in routes:
        to = str(ipaddress.IPv4Network(str(route["to"])))
        if (to, route["via"]) in present:
            plan.append(_cmd("role route", "ip", "route", "del", to, "via", route["via"]))
    devices = {d["ifname"]: d for d in addr_json}
    for iface in interfaces:
        dev = iface["linux_device"]
        have = {
            (a.get("local"), int(a.get("prefixlen", -1)))
            for a in devices.get(dev, {}).get("addr_info", [])
            if a.get("family") == "inet"
        }
        if (iface["address"], int(iface["prefix"])) in have:
            cidr = f"{iface['address']}/{int(iface['prefix'])}"
            plan.append(_cmd("role address", "ip", "addr", "del", cidr, "dev", dev))
    return plan


def linux_ip_batch(interfaces: list[Mapping[str, Any]], routes: list[Mapping[str, Any]]) -> str:
    """`ip -batch` file replayed at boot by the persistence unit (replace = idempotent)."""
    lines = []
    for iface in interfaces:
        dev = iface["linux_device"]
        lines.append(f"link set dev {dev} up")
        lines.append(f"addr replace {iface['address']}/{int(iface['prefix'])} dev {dev}")
    for route in routes:
        to = str(ipaddress.IPv4Network(str(route["to"])))
        dev = route_interface(route, interfaces)["linux_device"]
        lines.append(f"route replace {to} via {route['via']} dev {dev}")
    return "\n".join(lines) + "\n"


def nmcli_routes(
    iface: Mapping[str, Any], routes: list[Mapping[str, Any]], interfaces: list[Mapping[str, Any]]
) -> list[str]:
    """routes4 entries ("10.10.0.0/24 192.168.51.2") for the connection of one interface."""
    return [
        f"{ipaddress.IPv4Network(str(r['to']))} {r['via']}"
        for r in routes
        if route_interface(r, interfaces)["link"] == iface["link"]
    ]


def _nmcli_fields(line: str) -> list[str]:
    """Split one `nmcli -t` line on unescaped colons (values escape ':' and '\\')."""
    fields, cur, escaped = [], [], False
    for ch in line:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    fields.append("".join(cur))
    return fields


def _int(text: str, default: int = 0) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def nmcli_parse_profiles(text: str) -> list[dict[str, Any]]:
    """`nmcli -t -f UUID,TYPE,AUTOCONNECT-PRIORITY,NAME connection show` -> one dict per line."""
    profiles = []
    for line in text.splitlines():
        if not line.strip():
            continue
        uuid, ctype, priority, name = [*_nmcli_fields(line), "", "", ""][:4]
        profiles.append({"uuid": uuid, "type": ctype, "priority": _int(priority), "name": name})
    return profiles


def nmcli_profile_details(results: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Loop results of `nmcli -t -f connection.interface-name,... connection show uuid U`
    (item = the parsed profile) -> profiles with the device they are bound to ('' = any)."""
    profiles = []
    for result in results:
        values = {}
        for line in str(result.get("stdout", "")).splitlines():
            key, _, value = line.partition(":")
            values[key.strip()] = value.strip()
        item = dict(result["item"])
        item["device"] = values.get("connection.interface-name", "")
        if item["device"] == "--":
            item["device"] = ""
        item["priority"] = _int(values.get("connection.autoconnect-priority"), item["priority"])
        profiles.append(item)
    return profiles


def nmcli_active_by_device(text: str, prefix: str, devices: Iterable[str]) -> dict[str, str]:
    """`nmcli -t -f UUID,DEVICE,NAME connection show --active` -> {device: uuid} for the given
    devices, leaving out our own profiles (restore must not bring those back)."""
    wanted = set(devices)
    active = {}
    for line in text.splitlines():
        uuid, device, name = [*_nmcli_fields(line), "", ""][:3]
        if device in wanted and not name.startswith(prefix):
            active[device] = uuid
    return active


def nmcli_priority(
    profiles: list[Mapping[str, Any]], device: str, prefix: str, floor: int = 100
) -> int:
    """Autoconnect priority for our profile on device: one above every other Ethernet profile
    that can take that device (bound to it or to none), at least floor, at most 999."""
    rivals = [
        int(p["priority"])
        for p in profiles
        if not str(p["name"]).startswith(prefix) and p.get("device", "") in (device, "")
    ]
    return min(999, max([int(floor), *[r + 1 for r in rivals]]))


# ---------------------------------------------------------------- macOS (networksetup)


def parse_getinfo(text: str) -> dict[str, str | None]:
    """`networksetup -getinfo <service>` -> {method: manual|dhcp|other, ip, mask, router}."""
    info: dict[str, str | None] = {"method": "other", "ip": None, "mask": None, "router": None}
    for raw in text.splitlines():
        line = raw.strip()
        low = line.lower()
        if low.startswith("manual configuration"):
            info["method"] = "manual"
        elif low.startswith("dhcp configuration"):
            info["method"] = "dhcp"
        elif ":" in line:
            key, _, value = line.partition(":")
            value = value.strip()
            key = key.strip().lower()
            if key == "ip address":
                info["ip"] = value if _IPV4.fullmatch(value) else None
            elif key == "subnet mask":
                info["mask"] = value if _IPV4.fullmatch(value) else None
            elif key == "router":
                info["router"] = value if _IPV4.fullmatch(value) else None
    return info


def parse_additional_routes(text: str) -> list[Triple]:
    """`networksetup -getadditionalroutes <service>`: one "dest mask gateway" per line."""
    triples = []
    for line in text.splitlines():
        found = _IPV4.findall(line)
        if len(found) == 3:
            triples.append((found[0], found[1], found[2]))
    return triples


def parse_services(text: str) -> dict[str, bool]:
    """`networksetup -listallnetworkservices` -> {service: enabled}; '*' marks disabled ones."""
    services: dict[str, bool] = {}
    for line in text.splitlines()[1:]:  # first line is the "An asterisk..." legend
        name = line.strip()
        if not name:
            continue
        enabled = not name.startswith("*")
        services[name.lstrip("*").strip()] = enabled
    return services


def parse_hardware_ports(text: str) -> dict[str, str]:
    """`networksetup -listallhardwareports` -> {hardware port: device}, e.g. Ethernet: en0."""
    ports: dict[str, str] = {}
    port = None
    for raw in text.splitlines():
        key, _, value = raw.partition(":")
        if key.strip() == "Hardware Port":
            port = value.strip()
            ports[port] = ""
        elif key.strip() == "Device" and port is not None:
            ports[port] = value.strip()
    return ports


_ORDER_PORT = re.compile(r"^\(Hardware Port: (.*), Device: (.*)\)$")
_ORDER_NAME = re.compile(r"^\((?:\d+|\*)\)\s+(.*)$")


def parse_service_order(text: str) -> dict[str, str]:
    """`networksetup -listnetworkserviceorder` -> {service: its hardware port}."""
    order: dict[str, str] = {}
    name = None
    for raw in text.splitlines():
        line = raw.strip()
        if found := _ORDER_NAME.match(line):
            name = found.group(1).lstrip("*").strip()
        elif (found := _ORDER_PORT.match(line)) and name is not None:
            order[name] = found.group(1)
            name = None
    return order


def darwin_interfaces(
    observed: Mapping[str, Any],
    interfaces: list[Mapping[str, Any]],
    mode: str = "bridge",
    routes: list[Mapping[str, Any]] | None = None,
) -> dict[str, list[Any]]:
    """Name each link's service from what the Mac has, before anything changes.

    A link names a service (`macos_service`), a hardware port (`macos_hardware_port`, e.g.
    "Thunderbolt 1", "USB 10/100/1000 LAN"), or both. A port resolves to the service on it;
    in p2p mode a port without a service gets one (darwin_plan creates it). Anything else is
    an error naming the link, the name and what this Mac does have.
    """
    services = parse_services(observed.get("services_list", ""))
    ports = parse_hardware_ports(observed.get("hardware_ports", ""))
    on_port = parse_service_order(observed.get("service_order", ""))
    resolved: list[Any] = []
    errors: list[str] = []
    have = (
        f"this Mac has services: {', '.join(services) or 'none'}; "
        f"hardware ports: {', '.join(ports) or 'none'}"
    )
    for iface in interfaces:
        item = dict(iface)
        svc, port = item.get("macos_service"), item.get("macos_hardware_port")
        if not svc and port:
            svc = next((s for s, p in on_port.items() if p == port), None)
            if svc is None and mode == "p2p" and port in ports:
                svc = port
            if svc is None:
                errors.append(f"{item['link']}: macos_hardware_port {port!r} not found; {have}")
                continue
            item["macos_service"] = svc
        elif svc and svc not in services and not (mode == "p2p" and (port or svc) in ports):
            errors.append(f"{item['link']}: macos_service {svc!r} not found; {have}")
            continue
        resolved.append(item)
    for route in routes or []:
        svc = route.get("macos_service")
        if svc and svc not in services and svc not in [i["macos_service"] for i in resolved]:
            errors.append(f"route to {route['to']}: macos_service {svc!r} not found; {have}")
    return {"interfaces": resolved, "errors": errors}


def _route_triple(route: Mapping[str, Any]) -> Triple:
    net = ipaddress.IPv4Network(str(route["to"]))
    return (str(net.network_address), str(net.netmask), str(route["via"]))


def _routes_by_service(interfaces, routes) -> dict[str, list[Triple]]:
    grouped: dict[str, list[Triple]] = {}
    for route in routes:
        service = route.get("macos_service") or route_interface(route, interfaces).get(
            "macos_service"
        )
        if not service:
            raise AnsibleFilterError(
                f"network_routes: route to {route['to']} has no macos_service to carry it"
            )
        grouped.setdefault(service, []).append(_route_triple(route))
    return grouped


def _merge_routes(current: list[Triple], wanted: list[Triple]) -> list[Triple]:
    """Keep every route already on the service; replace same destination, append new ones."""
    merged = list(current)
    for triple in wanted:
        same = [i for i, c in enumerate(merged) if c[:2] == triple[:2]]
        if same:
            merged[same[0]] = triple
            for i in reversed(same[1:]):
                del merged[i]
        else:
            merged.append(triple)
    return merged


def darwin_plan(
    observed: Mapping[str, Any],
    interfaces: list[Mapping[str, Any]],
    routes: list[Mapping[str, Any]],
    forwarding: bool,
    mode: str = "bridge",
    bridge_service: str = "Thunderbolt Bridge",
) -> list[Command]:
    """networksetup/sysctl commands for a Mac, from what `darwin_observe.yml` read."""
    plan: list[Command] = []
    services = parse_services(observed.get("services_list", ""))
    per_service = observed.get("services", {})
    mac_ifaces = [i for i in interfaces if i.get("macos_service")]
    if mode == "p2p":
        if services.get(bridge_service, False):
            plan.append(
                _cmd(
                    "p2p: a bridged ring of Macs loops; one /30 per cable instead",
                    "networksetup",
                    "-setnetworkserviceenabled",
                    bridge_service,
                    "off",
                )
            )
        for iface in mac_ifaces:
            svc = iface["macos_service"]
            if svc not in services:
                port = iface.get("macos_hardware_port") or svc
                plan.append(
                    _cmd(
                        f"p2p: service for port {port}",
                        "networksetup",
                        "-createnetworkservice",
                        svc,
                        port,
                    )
                )
    elif any(i["macos_service"] == bridge_service for i in mac_ifaces) and (
        services.get(bridge_service) is False
    ):
        plan.append(
            _cmd(
                "bridge mode: service disabled",
                "networksetup",
                "-setnetworkserviceenabled",
                bridge_service,
                "on",
            )
        )
    for iface in mac_ifaces:
        svc = iface["macos_service"]
        info = parse_getinfo(per_service.get(svc, {}).get("getinfo", ""))
        mask = prefix_to_mask(iface["prefix"])
        if (info["method"], info["ip"], info["mask"], info["router"]) != (
            "manual",
            iface["address"],
            mask,
            None,
        ):
            plan.append(
                _cmd(
                    f"{svc}: {info['method']} {info['ip']}/{info['mask']}",
                    "networksetup",
                    "-setmanual",
                    svc,
                    iface["address"],
                    mask,
                )
            )
    for svc, wanted in _routes_by_service(mac_ifaces, routes).items():
        current = parse_additional_routes(per_service.get(svc, {}).get("routes", ""))
        merged = _merge_routes(current, wanted)
        if merged != current:
            argv = ["networksetup", "-setadditionalroutes", svc]
            for triple in merged:
                argv.extend(triple)
            plan.append(_cmd(f"{svc}: routes replace the whole list, merged", *argv))
    if forwarding and str(observed.get("forwarding", "0")).strip() != "1":
        plan.append(
            _cmd("gateway Mac forwards edge <-> fabric", "sysctl", "-w", "net.inet.ip.forwarding=1")
        )
    return plan


def darwin_restore_plan(
    saved: Mapping[str, Any],
    interfaces: list[Mapping[str, Any]],
    forwarding: bool,
    mode: str = "bridge",
    bridge_service: str = "Thunderbolt Bridge",
) -> list[Command]:
    """Put back what `darwin_observe.yml` saw before the role's first change."""
    plan: list[Command] = []
    per_service = saved.get("services", {})
    for iface in (i for i in interfaces if i.get("macos_service")):
        svc = iface["macos_service"]
        if svc not in per_service:
            continue
        info = parse_getinfo(per_service[svc].get("getinfo", ""))
        if info["method"] == "manual" and info["ip"] and info["mask"]:
            argv = ["networksetup", "-setmanual", svc, info["ip"], info["mask"]]
            if info["router"]:
                argv.append(info["router"])
            plan.append(_cmd(f"{svc}: back to manual {info['ip']}", *argv))
        else:
            plan.append(_cmd(f"{svc}: back to DHCP", "networksetup", "-setdhcp", svc))
    for svc, data in per_service.items():
        argv = ["networksetup", "-setadditionalroutes", svc]
        for triple in parse_additional_routes(data.get("routes", "")):
            argv.extend(triple)
        plan.append(_cmd(f"{svc}: routes as before", *argv))
    if forwarding and str(saved.get("forwarding", "0")).strip() != "1":
        plan.append(_cmd("forwarding was off", "sysctl", "-w", "net.inet.ip.forwarding=0"))
    if mode == "p2p" and parse_services(saved.get("services_list", "")).get(bridge_service):
        plan.append(
            _cmd(
                "bridge service was on",
                "networksetup",
                "-setnetworkserviceenabled",
                bridge_service,
                "on",
            )
        )
    return plan


# ---------------------------------------------------------------- verification


def verify_targets(
    hostvars: Mapping[str, Any],
    host: str,
    all_hosts: list[str],
    server_hosts: list[str],
    isolated_hosts: list[str],
    fabric_link: str = "fabric",
) -> dict[str, list[str]]:
    """What this host must reach (link peers, the server's fabric address) and must not."""

    def ifaces(name: str) -> list[Mapping[str, Any]]:
        hv = hostvars[name]
        return list(hv.get("cluster_interfaces", None) or [])

    def routes(name: str) -> list[Mapping[str, Any]]:
        return list(hostvars[name].get("cluster_routes", None) or [])

    mine = ifaces(host)
    my_links = {i["link"] for i in mine}
    reach: list[str] = []
    for other in all_hosts:
        if other == host:
            continue
        reach += [i["address"] for i in ifaces(other) if i["link"] in my_links]
    if routes(host):
        for server in server_hosts:
            reach += [i["address"] for i in ifaces(server) if i["link"] == fabric_link]
    unreachable: list[str] = []
    if host in isolated_hosts:
        for other in isolated_hosts:
            if other == host:
                continue
            unreachable += [i["address"] for i in ifaces(other) if i["link"] not in my_links]
            unreachable += [r["via"] for r in routes(other)]
    own = {i["address"] for i in mine}
    dedup = [a for a in dict.fromkeys(reach) if a not in own]
    blocked = [a for a in dict.fromkeys(unreachable) if a not in dedup]
    return {"reach": dedup, "unreachable": blocked}


def default_routes(routes: list[Mapping[str, Any]]) -> list[list[str]]:
    """`ip -j route show default table all` without volatile fields (an RA route's expiry)."""
    keys = ("dst", "gateway", "dev", "table", "protocol", "metric")
    return sorted([[str(r.get(k, "")) for k in keys] for r in routes])


def observed_service(pair: list[str]) -> dict[str, str]:
    """[getinfo output, getadditionalroutes output] -> the per-service observed record."""
    return {"getinfo": pair[0], "routes": pair[1]}


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "network_prefix_to_mask": prefix_to_mask,
            "network_validation_errors": validation_errors,
            "network_linux_ip_plan": linux_ip_plan,
            "network_linux_ip_restore_plan": linux_ip_restore_plan,
            "network_linux_ip_batch": linux_ip_batch,
            "network_nmcli_routes": nmcli_routes,
            "network_nmcli_parse_profiles": nmcli_parse_profiles,
            "network_nmcli_profile_details": nmcli_profile_details,
            "network_nmcli_active_by_device": nmcli_active_by_device,
            "network_nmcli_priority": nmcli_priority,
            "network_darwin_plan": darwin_plan,
            "network_darwin_restore_plan": darwin_restore_plan,
            "network_darwin_interfaces": darwin_interfaces,
            "network_verify_targets": verify_targets,
            "network_observed_service": observed_service,
            "network_default_routes": default_routes,
        }
