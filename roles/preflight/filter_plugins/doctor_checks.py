"""Pure checks for doctor.yml: cluster addresses present, routes leaving by the right link, and
one line per failed rung. The tasks read the host (`ip -j`, `route -n get`, `networksetup
-getinfo`) read-only and hand the output here; tests/test_doctor_checks.py feeds the same shapes.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any


def linux_address_errors(
    host: str, interfaces: Iterable[Mapping[str, Any]], addr_json: list[Mapping[str, Any]]
) -> list[str]:
    """Each cluster link's address/prefix must be on its linux_device (`ip -j -4 addr show`)."""
    have: dict[str, list[str]] = {}
    for dev in addr_json:
        have[str(dev.get("ifname"))] = [
            f"{a.get('local')}/{a.get('prefixlen')}" for a in dev.get("addr_info", [])
        ]
    errors = []
    for iface in interfaces:
        dev = iface.get("linux_device")
        if not dev:
            continue
        wanted = f"{iface['address']}/{iface.get('prefix', 24)}"
        if wanted not in have.get(str(dev), []):
            errors.append(
                f"{host}: {dev} (link {iface.get('link')}) does not hold {wanted} (it has: "
                f"{', '.join(have.get(str(dev), [])) or 'no IPv4 address'}); fix: run site.yml "
                "(network role), and check the cable is plugged in"
            )
    return errors


def darwin_address_errors(
    host: str, interfaces: Iterable[Mapping[str, Any]], getinfo: Mapping[str, str]
) -> list[str]:
    """Each cluster link's address on its macos_service (`networksetup -getinfo <service>`)."""
    errors = []
    for iface in interfaces:
        svc = iface.get("macos_service")
        if not svc or svc not in getinfo:
            continue
        found = re.search(r"(?m)^IP address: *(\S+)", getinfo[svc])
        has = found.group(1) if found else "none"
        if has != str(iface["address"]):
            errors.append(
                f"{host}: service {svc!r} (link {iface.get('link')}) has IP address {has}, not "
                f"{iface['address']}; fix: run site.yml (network role), and check the cable"
            )
    return errors


def route_targets(
    interfaces: Iterable[Mapping[str, Any]],
    routes: Iterable[Mapping[str, Any]],
    dial_address: str | None,
) -> list[dict[str, str]]:
    """What to look up with `route get`: each cluster route's first address (must leave via its
    gateway), and the server address this worker dials (must leave by a cluster link) unless
    the host has no cluster links (it dials over the LAN)."""
    targets = []
    for route in routes:
        net = ipaddress.ip_network(str(route["to"]), strict=False)
        first = next(net.hosts(), net.network_address)
        targets.append({"address": str(first), "via": str(route["via"]), "to": str(net)})
    known = any(t["address"] == dial_address for t in targets)
    if dial_address and list(interfaces) and not known:
        targets.append({"address": str(dial_address), "via": "", "to": ""})
    return targets


def _lookup(system: str, stdout: str) -> tuple[str, str]:
    """(gateway, device) from `ip -j -4 route get` or macOS `route -n get`."""
    if system == "Linux":
        try:
            found = (json.loads(stdout) or [{}])[0]
        except (ValueError, IndexError):
            return "", ""
        return str(found.get("gateway", "")), str(found.get("dev", ""))
    gateway = re.search(r"(?m)^ *gateway: *(\S+)", stdout)
    device = re.search(r"(?m)^ *interface: *(\S+)", stdout)
    return (gateway.group(1) if gateway else "", device.group(1) if device else "")


def route_error(
    host: str,
    system: str,
    target: Mapping[str, str],
    result: Mapping[str, Any],
    cluster_devices: Iterable[str],
) -> str:
    """'' when `target` leaves as it should, else one sentence with the fix."""
    address = target["address"]
    if result.get("rc", 0) != 0:
        why = (str(result.get("stderr", "")) or str(result.get("msg", ""))).strip()
        return (
            f"{host}: no route to {address} ({why}): the cluster route is missing; fix: run "
            "site.yml (network role)"
        )
    gateway, device = _lookup(system, str(result.get("stdout", "")))
    shown = f"via {gateway} dev {device}" if gateway else f"dev {device} (on-link)"
    if target.get("via"):
        if gateway != target["via"]:
            return (
                f"{host}: {target['to']} should be routed via {target['via']}, but {address} goes "
                f"{shown}: the cluster route is missing; fix: run site.yml (network role)"
            )
        return ""
    devices = list(cluster_devices)
    if devices and device not in devices:
        return (
            f"{host}: the server address {address} goes {shown}, not over a cluster link "
            f"({', '.join(devices)}): a cluster route is missing; fix: run site.yml (network role)"
        )
    return ""


def route_error_of(
    result: Mapping[str, Any], host: str, system: str, cluster_devices: Iterable[str]
) -> str:
    """route_error for one result of the looped `route get` (its item is the target)."""
    if result.get("skipped"):
        return ""
    return route_error(host, system, result["item"], result, cluster_devices)


def _failure_text(result: Mapping[str, Any]) -> str:
    parts = [str(result.get("msg", "")), str(result.get("module_stderr", ""))]
    if result.get("rc") not in (None, 0):
        parts.append(str(result.get("stderr", "")))
    text = " ".join(p for p in parts if p).replace("Task failed: ", "")
    return re.sub(r"\s+", " ", text).strip()


def failure_line(rung: str, result: Mapping[str, Any]) -> str:
    """A failed task's result as `<rung>: <what>`, one line. A failed loop says what its failed
    items said, not Ansible's "One or more items failed"."""
    items = [r for r in result.get("results", []) if isinstance(r, Mapping) and r.get("failed")]
    text = "; ".join(_failure_text(r) for r in items) if items else _failure_text(result)
    return f"{rung}: {text or 'failed'}"


def lines(hostvars: Mapping[str, Any], hosts: Iterable[str]) -> list[str]:
    """doctor.yml's verdict: `<host>: ok` or `<host>: <rung>: <what, errno, fix>`."""
    return [f"{h}: {hostvars[h].get('preflight__doctor_red') or 'ok'}" for h in hosts]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "doctor_linux_address_errors": linux_address_errors,
            "doctor_darwin_address_errors": darwin_address_errors,
            "doctor_route_targets": route_targets,
            "doctor_route_error": route_error,
            "doctor_route_error_of": route_error_of,
            "doctor_failure_line": failure_line,
            "doctor_lines": lines,
        }
