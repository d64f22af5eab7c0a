"""A fake Mac for the Darwin task files: macOS's admin tools as small scripts on PATH.

Each tool answers as its macOS man page (networksetup(8), launchctl(1), sysctl(8),
caffeinate(8), socketfilterfw, xcode-select(1), sw_vers(1), pmset(1), dseditgroup(8), route(8),
netstat(1)) describes, including the errors for unknown services and unloaded jobs. They keep
their state in one JSON file in a directory of the test's, record every call there, and never
touch this machine's network or launchd. Writers (networksetup -set*, sysctl -w, launchctl
bootstrap, bootout, kickstart) refuse to run unless they come through the fake `sudo`, as on a
Mac where the login user is not root, so a task that forgets `become` fails here too.

    install(bin_dir, state_dir, state) -> writes the wrappers; run a playbook with bin_dir first
    on PATH; read_state(state_dir) / calls(state_dir) to check what happened.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import plistlib
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

TOOLS = (
    "networksetup", "launchctl", "sysctl", "caffeinate", "socketfilterfw", "xcode-select",
    "sw_vers", "pmset", "dseditgroup", "route", "netstat", "sudo",
)  # fmt: skip

ROUTES_NONE = "There are no additional IPv4 routes on this service."
INVALID = "** Error: The parameters were not valid.\n"
LEGEND = "An asterisk (*) denotes that a network service is disabled."


def mac_mini(**overrides: Any) -> dict[str, Any]:
    """A fresh Mac mini with a USB Ethernet dongle: DHCP everywhere, no forwarding."""
    state: dict[str, Any] = {
        "hardware_ports": [
            {"port": "Ethernet", "device": "en0"},
            {"port": "Wi-Fi", "device": "en1"},
            {"port": "Thunderbolt 1", "device": "en2"},
            {"port": "Thunderbolt 2", "device": "en3"},
            {"port": "USB 10/100/1000 LAN", "device": "en5"},
            {"port": "Thunderbolt Bridge", "device": "bridge0"},
        ],
        "services": [
            {"name": "Ethernet", "port": "Ethernet"},
            {"name": "Wi-Fi", "port": "Wi-Fi"},
            {"name": "USB 10/100/1000 LAN", "port": "USB 10/100/1000 LAN"},
            {"name": "Thunderbolt Bridge", "port": "Thunderbolt Bridge"},
        ],
        "sysctl": {"net.inet.ip.forwarding": "0"},
        "launchd": {},
        "firewall": {"state": 0, "stealth": False},
        "clt": True,
        "admins": [],
        "version": "15.5",
        "sleep_min": 1,
        # The Wi-Fi's DHCP lease: its subnet and the default route (route(8), netstat(1)).
        "wifi": {"network": "192.0.2.0/24", "gateway": "192.0.2.1", "device": "en1"},
    }
    for svc in state["services"]:
        svc.setdefault("enabled", True)
        svc.setdefault("method", "dhcp")
        svc.setdefault("ip", None)
        svc.setdefault("mask", None)
        svc.setdefault("router", None)
        svc.setdefault("routes", [])
    state.update(overrides)
    return state


def install(bin_dir: Path, state_dir: Path, state: dict[str, Any]) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "state.json").write_text(json.dumps(state, indent=1))
    (state_dir / "calls.jsonl").write_text("")
    for tool in TOOLS:
        wrapper = bin_dir / tool
        wrapper.write_text(
            "#!/bin/sh\n"
            f'FAKE_MACOS_STATE="{state_dir}" exec "{sys.executable}" "{Path(__file__)}" '
            f'{tool} "$@"\n'
        )
        wrapper.chmod(0o755)


def read_state(state_dir: Path) -> dict[str, Any]:
    return json.loads((state_dir / "state.json").read_text())


def calls(state_dir: Path) -> list[dict[str, Any]]:
    text = (state_dir / "calls.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line]


# ------------------------------------------------------------------ the tools


class Exit(Exception):
    def __init__(self, code: int, out: str = "", err: str = "") -> None:
        super().__init__(code)
        self.code, self.out, self.err = code, out, err


def _root() -> bool:
    return os.environ.get("FAKE_MACOS_SUDO") == "1"


def _need_root(what: str) -> None:
    if not _root():
        raise Exit(1, err=f"{what}: Operation not permitted (run it with sudo)\n")


def _service(state: dict[str, Any], name: str) -> dict[str, Any]:
    for svc in state["services"]:
        if svc["name"] == name:
            return svc
    # networksetup's words for a name it does not know; the exit status is a guess (4).
    raise Exit(
        4,
        out=f"{name} is not a recognized network service.\n{INVALID}",
    )


def networksetup(state: dict[str, Any], argv: list[str]) -> str:
    if not argv:
        raise Exit(1, err="Usage: networksetup -<command>\n")
    cmd, args = argv[0], argv[1:]
    services = state["services"]
    if cmd == "-listallnetworkservices":
        return (
            LEGEND
            + "\n"
            + "".join(("" if s["enabled"] else "*") + s["name"] + "\n" for s in services)
        )
    if cmd == "-listallhardwareports":
        body = "".join(
            f"\nHardware Port: {p['port']}\nDevice: {p['device']}\nEthernet Address: N/A\n"
            for p in state["hardware_ports"]
        )
        return body + "\nVLAN Configurations\n===================\n"
    if cmd == "-listnetworkserviceorder":
        devices = {p["port"]: p["device"] for p in state["hardware_ports"]}
        out = LEGEND + "\n"
        for i, s in enumerate(services, 1):
            mark = str(i) if s["enabled"] else "*"
            port = f"(Hardware Port: {s['port']}, Device: {devices[s['port']]})"
            out += f"\n({mark}) {s['name']}\n{port}\n"
        return out
    if cmd == "-getinfo":
        svc = _service(state, args[0])
        head = "Manual Configuration" if svc["method"] == "manual" else "DHCP Configuration"
        ip = svc["ip"] or "169.254.10.20"
        mask = svc["mask"] or "255.255.0.0"
        return (
            f"{head}\nIP address: {ip}\nSubnet mask: {mask}\nRouter: {svc['router'] or '(null)'}\n"
        )
    if cmd == "-getadditionalroutes":
        svc = _service(state, args[0])
        if not svc["routes"]:
            return ROUTES_NONE + "\n"
        return "".join(" ".join(r) + "\n" for r in svc["routes"])
    if cmd in ("-setmanual", "-setdhcp", "-setadditionalroutes", "-setnetworkserviceenabled",
               "-createnetworkservice"):  # fmt: skip
        _need_root(f"networksetup {cmd}")
    if cmd == "-setmanual":
        svc = _service(state, args[0])
        svc.update(method="manual", ip=args[1], mask=args[2], router=args[3] if args[3:] else None)
        return ""
    if cmd == "-setdhcp":
        _service(state, args[0]).update(method="dhcp", ip=None, mask=None, router=None)
        return ""
    if cmd == "-setadditionalroutes":
        svc, rest = _service(state, args[0]), args[1:]
        if len(rest) % 3:
            raise Exit(4, out="** Error: The parameters were not valid.\n")
        svc["routes"] = [rest[i : i + 3] for i in range(0, len(rest), 3)]
        return ""
    if cmd == "-setnetworkserviceenabled":
        _service(state, args[0])["enabled"] = args[1] == "on"
        return ""
    if cmd == "-createnetworkservice":
        name, port = args
        if port not in {p["port"] for p in state["hardware_ports"]}:
            raise Exit(4, out=f"{port} is not a valid hardware port.\n")
        services.append({"name": name, "port": port, "enabled": True, "method": "dhcp",
                         "ip": None, "mask": None, "router": None, "routes": []})  # fmt: skip
        return ""
    raise Exit(1, err=f"networksetup: {cmd}: unknown command (not in this fake)\n")


def sysctl(state: dict[str, Any], argv: list[str]) -> str:
    if argv[:1] == ["-n"] and len(argv) == 2:
        if argv[1] not in state["sysctl"]:
            raise Exit(1, err=f"sysctl: unknown oid '{argv[1]}'\n")
        return state["sysctl"][argv[1]] + "\n"
    if argv[:1] == ["-w"] and len(argv) == 2 and "=" in argv[1]:
        name, value = argv[1].split("=", 1)
        _need_root(f"sysctl: {argv[1]}")
        old = state["sysctl"].get(name, "0")
        state["sysctl"][name] = value
        return f"{name}: {old} -> {value}\n"
    raise Exit(1, err="usage: sysctl [-n] name | -w name=value (this fake)\n")


def _service_target(argv: list[str]) -> str:
    if not argv or not argv[0].startswith("system/"):
        raise Exit(1, err="Unrecognized target specifier (this fake knows system/<label>).\n")
    return argv[0].split("/", 1)[1]


def _launch(plist: dict[str, Any]) -> int:
    """Start a job as launchd would at load: ProgramArguments in WorkingDirectory, with only the
    plist's EnvironmentVariables, stdout/stderr into StandardOutPath/StandardErrorPath (appended,
    created), detached. UserName is not honoured (the fake is not root on a Mac). Only when the
    state says run_programs: a real daemon's ProgramArguments (the forwarding daemon's
    /usr/sbin/sysctl) would otherwise run on this machine."""
    args = plist.get("ProgramArguments") or [plist["Program"]]

    def sink(key: str) -> Any:
        return open(plist[key], "ab") if plist.get(key) else subprocess.DEVNULL

    out, err = sink("StandardOutPath"), sink("StandardErrorPath")
    proc = subprocess.Popen(
        args, cwd=plist.get("WorkingDirectory") or "/", env=plist.get("EnvironmentVariables", {}),
        stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
    )  # fmt: skip
    return proc.pid


def launchctl(state: dict[str, Any], argv: list[str]) -> str:
    jobs = state["launchd"]
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    if cmd == "print":
        label = _service_target(args)
        if label not in jobs:
            raise Exit(113, err=f'Could not find service "{label}" in domain for system\n')
        job = jobs[label]
        return f"system/{label} = {{\n\tpath = {job['path']}\n\truns = {job['runs']}\n}}\n"
    if cmd == "bootstrap":
        _need_root("launchctl bootstrap")
        if args[:1] != ["system"] or len(args) != 2:
            raise Exit(1, err="Usage: launchctl bootstrap <domain-target> <service-path>\n")
        path = Path(args[1])
        if not path.is_file():
            raise Exit(5, err="Bootstrap failed: 5: Input/output error\n")
        st = path.stat()
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise Exit(
                5,
                err=f"Bootstrap failed: 5: Input/output error ({path}: bad ownership/mode)\n",
            )
        plist = plistlib.loads(path.read_bytes())
        label = plist.get("Label")
        if not label or not (plist.get("ProgramArguments") or plist.get("Program")):
            raise Exit(
                5, err="Bootstrap failed: 5: Input/output error (no Label/ProgramArguments)\n"
            )
        if label in jobs:  # already loaded: what current macOS says
            raise Exit(5, err="Bootstrap failed: 5: Input/output error\n")
        jobs[label] = {"path": str(path), "runs": 1 if plist.get("RunAtLoad") else 0,
                       "plist": plist}  # fmt: skip
        if plist.get("RunAtLoad") and state.get("run_programs"):
            jobs[label]["pid"] = _launch(plist)
        return ""
    if cmd == "bootout":
        _need_root("launchctl bootout")
        label = _service_target(args)
        if label not in jobs:
            raise Exit(3, err="Boot-out failed: 3: No such process\n")
        if jobs[label].get("pid"):  # launchd stops a running job it boots out (SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                os.kill(jobs[label]["pid"], signal.SIGTERM)
        del jobs[label]
        return ""
    if cmd == "kickstart":
        _need_root("launchctl kickstart")
        label = _service_target([a for a in args if not a.startswith("-")])
        if label not in jobs:
            raise Exit(113, err=f'Could not find service "{label}" in domain for system\n')
        jobs[label]["runs"] += 1
        return ""
    raise Exit(1, err=f"launchctl: {cmd}: unknown subcommand (not in this fake)\n")


def socketfilterfw(state: dict[str, Any], argv: list[str]) -> str:
    fw = state["firewall"]
    if argv == ["--getglobalstate"]:
        word = {0: "disabled", 1: "enabled", 2: "blocking all non-essential connections"}
        return f"Firewall is {word[fw['state']]}. (State = {fw['state']})\n"
    if argv == ["--getstealthmode"]:
        return f"Firewall stealth mode is {'on' if fw['stealth'] else 'off'}\n"
    raise Exit(1, err="socketfilterfw: only --getglobalstate/--getstealthmode in this fake\n")


def xcode_select(state: dict[str, Any], argv: list[str]) -> str:
    if argv == ["-p"]:
        if state["clt"]:
            return "/Library/Developer/CommandLineTools\n"
        raise Exit(2, err="xcode-select: error: unable to get active developer directory, use "
                          "`sudo xcode-select --switch path/to/Xcode.app` to set one (or see "
                          "`man xcode-select`)\n")  # fmt: skip
    raise Exit(1, err="xcode-select: only -p in this fake\n")


def sw_vers(state: dict[str, Any], argv: list[str]) -> str:
    if argv == ["-productVersion"]:
        return state["version"] + "\n"
    return f"ProductName:\t\tmacOS\nProductVersion:\t\t{state['version']}\n"


def pmset(state: dict[str, Any], argv: list[str]) -> str:
    if argv == ["-g"]:
        return (
            "System-wide power settings:\nCurrently in use:\n"
            f" standby              0\n sleep                {state['sleep_min']}\n"
            " displaysleep         10\n"
        )
    raise Exit(1, err="pmset: only -g in this fake\n")


def dseditgroup(state: dict[str, Any], argv: list[str]) -> str:
    if argv[:2] == ["-o", "checkmember"] and argv[2] == "-m" and len(argv) == 5:
        user, group = argv[3], argv[4]
        if group == "admin" and user in state["admins"]:
            return f"yes {user} is a member of {group}\n"
        raise Exit(1, out=f"no {user} is NOT a member of {group}\n")
    raise Exit(64, err="dseditgroup: only -o checkmember -m <user> <group> in this fake\n")


def _routes(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The IPv4 routing table the fake's state implies, most specific first: each enabled
    service's subnet on its device (the address networksetup gave it), each additional route
    (networksetup -setadditionalroutes) via its gateway out of that service's device, the
    Wi-Fi's subnet and the default route."""
    devices = {p["port"]: p["device"] for p in state["hardware_ports"]}
    wifi = state.get("wifi")
    table: list[dict[str, Any]] = []
    for svc in state["services"]:
        if not svc["enabled"] or not svc["ip"] or not svc["mask"]:
            continue
        device = devices[svc["port"]]
        net = ipaddress.ip_network(f"{svc['ip']}/{svc['mask']}", strict=False)
        table.append({"net": net, "gateway": None, "device": device, "static": False})
        for dest, mask, gateway in svc["routes"]:
            net = ipaddress.ip_network(f"{dest}/{mask}", strict=False)
            table.append({"net": net, "gateway": gateway, "device": device, "static": True})
    if wifi:
        table.append({"net": ipaddress.ip_network(wifi["network"]), "gateway": None,
                      "device": wifi["device"], "static": False})  # fmt: skip
        table.append({"net": ipaddress.ip_network("0.0.0.0/0"), "gateway": wifi["gateway"],
                      "device": wifi["device"], "static": True})  # fmt: skip
    return sorted(table, key=lambda r: -r["net"].prefixlen)


METRICS = " recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire\n"


def route(state: dict[str, Any], argv: list[str]) -> str:
    """`route -n get <ip>|default` as route(8) prints it; a miss is route's own error."""
    if argv[:2] != ["-n", "get"] or len(argv) != 3:
        raise Exit(1, err="route: only -n get <ip>|default in this fake\n")
    target = argv[2]
    try:
        address = ipaddress.ip_address("0.0.0.0" if target == "default" else target)
    except ValueError:
        raise Exit(1, err=f"route: bad address: {target}\n") from None
    found = next((r for r in _routes(state) if address in r["net"]), None)
    if found is None or (target == "default" and found["net"].prefixlen):
        raise Exit(1, err="route: writing to routing socket: not in table\n")
    net = found["net"]
    default = net.prefixlen == 0
    out = f"   route to: {target}\n"
    out += f"destination: {'default' if default else net.network_address}\n"
    out += f"       mask: {'default' if default else net.netmask}\n"
    if found["gateway"]:
        out += f"    gateway: {found['gateway']}\n"
    out += f"  interface: {found['device']}\n"
    if found["gateway"]:
        out += "      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING,GLOBAL>\n"
    else:
        out += "      flags: <UP,DONE,CLONING,PRCLONING,GLOBAL>\n"
    # The metrics row moves between calls (rtt), as on a live Mac; the route itself doesn't.
    state["route_calls"] = state.get("route_calls", 0) + 1
    rtt = state["route_calls"]
    return (
        out
        + METRICS
        + f"       0         0         0  {rtt:8d}         0         0      1500         0\n"
    )


def netstat(state: dict[str, Any], argv: list[str]) -> str:
    """`netstat -rn -f inet`: macOS shortens destinations ("10.10.0/24", "127")."""
    if argv != ["-rn", "-f", "inet"]:
        raise Exit(1, err="netstat: only -rn -f inet in this fake\n")

    def short(net: ipaddress.IPv4Network) -> str:
        if not net.prefixlen:
            return "default"
        octets = str(net.network_address).split(".")
        while len(octets) > 1 and octets[-1] == "0" and len(octets) * 8 > net.prefixlen:
            octets.pop()
        shown = ".".join(octets)
        return shown if len(octets) * 8 == net.prefixlen else f"{shown}/{net.prefixlen}"

    out = "Routing tables\n\nInternet:\n"
    out += f"{'Destination':<19}{'Gateway':<19}{'Flags':<15}{'Netif':<7}Expire\n"
    rows = sorted(_routes(state), key=lambda r: r["net"].prefixlen)
    rows.append({"net": ipaddress.ip_network("127.0.0.0/8"), "gateway": "127.0.0.1",
                 "device": "lo0", "static": True})  # fmt: skip
    for r in rows:
        flags = "UGSc" if r["gateway"] and r["device"] != "lo0" else "UCS"
        gateway = r["gateway"] or f"link#{4 + sorted(_devices(state)).index(r['device'])}"
        out += f"{short(r['net']):<19}{gateway:<19}{flags:<15}{r['device']:<7}\n"
    return out


def _devices(state: dict[str, Any]) -> set[str]:
    wifi = state.get("wifi")
    return {p["device"] for p in state["hardware_ports"]} | ({wifi["device"]} if wifi else set())


def caffeinate(state: dict[str, Any], argv: list[str]) -> str:
    return ""  # holds no assertion here; the call is recorded


TOOL_FUNCS = {
    "networksetup": networksetup, "launchctl": launchctl, "sysctl": sysctl,
    "caffeinate": caffeinate, "socketfilterfw": socketfilterfw, "xcode-select": xcode_select,
    "sw_vers": sw_vers, "pmset": pmset, "dseditgroup": dseditgroup, "route": route,
    "netstat": netstat,
}  # fmt: skip


def sudo(argv: list[str]) -> int:
    """sudo as Ansible calls it (sudo -H -S -n -u root [-p prompt] /bin/sh -c ...)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in ("-u", "-p") else 1
    env = {**os.environ, "FAKE_MACOS_SUDO": "1"}
    os.execvpe(argv[i], argv[i:], env)
    return 127


def main(argv: list[str]) -> int:
    tool, args = argv[0], argv[1:]
    state_dir = Path(os.environ["FAKE_MACOS_STATE"])
    with (state_dir / "calls.jsonl").open("a") as log:
        log.write(json.dumps({"tool": tool, "argv": args, "root": _root()}) + "\n")
    if tool == "sudo":
        return sudo(args)
    path = state_dir / "state.json"
    # Two hosts may run a tool at once, as two Macs would each have their own: one at a time.
    with (state_dir / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(path.read_text())
        try:
            out = TOOL_FUNCS[tool](state, args)
        except Exit as exc:
            sys.stdout.write(exc.out)
            sys.stderr.write(exc.err)
            return exc.code
        path.write_text(json.dumps(state, indent=1))
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
