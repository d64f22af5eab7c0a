"""Inventory helpers shared by the preflight and trainer roles.

The rule for which address a worker dials for the server lives here once, so the
preflight check and the rendered cluster config can never disagree.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

FABRIC_LINK = "fabric"


def _get(hostvars: Mapping[str, Any], host: str, key: str, default: Any = None) -> Any:
    try:
        value = hostvars[host][key]
    except KeyError:
        return default
    return default if value is None else value


def _interfaces(hostvars: Mapping[str, Any], host: str) -> list[dict[str, Any]]:
    return list(_get(hostvars, host, "cluster_interfaces", []) or [])


def _address_on(hostvars: Mapping[str, Any], host: str, link: str) -> str | None:
    for iface in _interfaces(hostvars, host):
        if iface.get("link") == link:
            return str(iface["address"])
    return None


def server_address(hostvars: Mapping[str, Any], server: str) -> str:
    """The server's own entry in host_ip: dial address, fabric address, else SSH address."""
    return str(
        _get(hostvars, server, "cluster_dial_address")
        or _address_on(hostvars, server, FABRIC_LINK)
        or _get(hostvars, server, "ansible_host", server)
    )


def dial_address(hostvars: Mapping[str, Any], worker: str, server: str) -> str | None:
    """Address `worker` dials for the server, or None when it has no way there.

    Order: explicit cluster_dial_address; the server's address on a link both
    hosts share; the server's fabric address when a static route of the worker
    covers it (Pis behind a gateway Mac).
    """
    explicit = _get(hostvars, worker, "cluster_dial_address")
    if explicit:
        return str(explicit)
    for iface in _interfaces(hostvars, worker):
        shared = _address_on(hostvars, server, iface.get("link", ""))
        if shared:
            return shared
    fabric = _address_on(hostvars, server, FABRIC_LINK)
    if fabric:
        target = ipaddress.ip_address(fabric)
        for route in _get(hostvars, worker, "cluster_routes", []) or []:
            if target in ipaddress.ip_network(str(route["to"]), strict=False):
                return fabric
    return None


def host_ip(hostvars: Mapping[str, Any], server: str, workers: Iterable[str]) -> dict[str, str]:
    """host_ip for the cluster config; raises when a worker has no server address."""
    table = {server: server_address(hostvars, server)}
    for worker in workers:
        address = dial_address(hostvars, worker, server)
        if address is None:
            raise ValueError(f"worker {worker} has no address to reach server {server}")
        table[worker] = address
    return table


def inventory_errors(
    hostvars: Mapping[str, Any], groups: Mapping[str, list[str]], workers: Iterable[str]
) -> list[str]:
    """Everything wrong with the inventory's cluster layout, one message per problem."""
    errors: list[str] = []
    servers = list(groups.get("server", []))
    if len(servers) != 1:
        errors.append(
            f"group 'server' must hold exactly one host, found {len(servers)}: "
            f"{', '.join(servers) or 'none'}"
        )
    workers = list(workers)
    if not workers:
        errors.append("no workers: group 'workers' (or -e workers=...) is empty")
    for worker in workers:
        if worker not in hostvars:
            errors.append(f"worker {worker} is not a host of this inventory")
        elif servers and worker in servers:
            errors.append(f"host {worker} is both the server and a worker")
    if len(servers) == 1:
        for worker in workers:
            if worker in hostvars and dial_address(hostvars, worker, servers[0]) is None:
                errors.append(
                    f"worker {worker} has no server address: set cluster_dial_address, share a "
                    f"link with {servers[0]}, or add a cluster_routes entry covering its "
                    "fabric address"
                )
    errors.extend(_address_errors(hostvars, groups.get("all", [])))
    errors.extend(_route_errors(hostvars, groups.get("all", [])))
    return errors


def _route_errors(hostvars: Mapping[str, Any], hosts: Iterable[str]) -> list[str]:
    """A static route's gateway must sit on one of the host's own links."""
    errors = []
    for host in hosts:
        nets = []
        for iface in _interfaces(hostvars, host):
            try:
                nets.append(ipaddress.ip_interface(f"{iface['address']}/{iface.get('prefix', 24)}"))
            except (KeyError, ValueError):
                continue  # reported by _address_errors
        for route in _get(hostvars, host, "cluster_routes", []) or []:
            via = ipaddress.ip_address(str(route.get("via")))
            if not any(via in net.network for net in nets):
                errors.append(
                    f"host {host}: route to {route.get('to')} via {via} is on none of its links"
                )
    return errors


def _address_errors(hostvars: Mapping[str, Any], hosts: Iterable[str]) -> list[str]:
    errors: list[str] = []
    owners: dict[str, str] = {}
    subnets: dict[str, set[str]] = {}
    for host in hosts:
        for iface in _interfaces(hostvars, host):
            link = str(iface.get("link", "?"))
            try:
                net = ipaddress.ip_interface(f"{iface['address']}/{iface.get('prefix', 24)}")
            except (KeyError, ValueError) as exc:
                errors.append(f"host {host} link {link}: bad address ({exc})")
                continue
            address = str(net.ip)
            if address in owners and owners[address] != host:
                errors.append(f"address {address} is used by both {owners[address]} and {host}")
            owners[address] = host
            subnets.setdefault(link, set()).add(str(net.network))
    for link, nets in sorted(subnets.items()):
        if len(nets) > 1:
            errors.append(f"link {link} spans several subnets: {', '.join(sorted(nets))}")
    return errors


def _covers(hostvars: Mapping[str, Any], host: str, other: str) -> bool:
    """host has a cluster route to one of other's cluster addresses."""
    addresses = [ipaddress.ip_address(str(i["address"])) for i in _interfaces(hostvars, other)]
    for route in _get(hostvars, host, "cluster_routes", []) or []:
        net = ipaddress.ip_network(str(route["to"]), strict=False)
        if any(a in net for a in addresses):
            return True
    return False


def mesh_gaps(hostvars: Mapping[str, Any], hosts: Iterable[str]) -> list[list[str]]:
    """Pairs of hosts that cannot reach each other, for gloo, which needs a full mesh.

    Two hosts reach each other when they share a link or each has a cluster route to the
    other's addresses; a host with no cluster links (the MacBook on Wi-Fi, the local default)
    reaches everyone over the LAN."""
    hosts = list(dict.fromkeys(hosts))
    gaps = []
    for i, a in enumerate(hosts):
        for b in hosts[i + 1 :]:
            links_a = {iface.get("link") for iface in _interfaces(hostvars, a)}
            links_b = {iface.get("link") for iface in _interfaces(hostvars, b)}
            if not links_a or not links_b or links_a & links_b:
                continue
            if _covers(hostvars, a, b) and _covers(hostvars, b, a):
                continue
            gaps.append([a, b])
    return gaps


def worker_list(value: Any, default: Iterable[str]) -> list[str]:
    """Normalise -e workers=a,b (string) or a YAML list; empty/None means the default."""
    if value is None or value == "":
        return list(default)
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return [str(item) for item in value]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "smolcluster_host_ip": host_ip,
            "smolcluster_dial_address": dial_address,
            "smolcluster_server_address": server_address,
            "smolcluster_inventory_errors": inventory_errors,
            "smolcluster_worker_list": worker_list,
            "smolcluster_mesh_gaps": mesh_gaps,
        }
