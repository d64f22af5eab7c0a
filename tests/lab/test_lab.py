"""End to end on the lab: six booted containers (systemd, sshd, NetworkManager on the Pis), the
real playbooks over SSH as the login user `smol` with become, against real routing, checked from
inside the namespaces (never from the root namespace).

One lab for the module (fixture `lab`), then phases in order, each its own test:
site.yml → routing → site.yml again (changed=0) → doctor.yml (ok, then four hosts broken on
purpose under train.yml -e doctor=true) → train.yml -e epochs=1 (sync, every worker;
pi4's job a systemd unit) → a reboot of pi5 and mini3 (links, routes and forwarding come back by
themselves) → an elastic run with no second site.yml (pi5's cable pulled and plugged back,
mini2's worker killed) → teardown.yml -e restore_network=true → lab down. A phase whose
prerequisite failed skips.

Needs root, `ip netns`, systemd-nspawn, debootstrap, socat and ping; skips with the reason
otherwise, unless SMOLCLUSTER_REQUIRE_LAB=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smolcluster.events import read_records
from tests.ansible_helpers import doctor_lines

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "tests" / "lab" / "lab.sh"
LAB_DIR = REPO / ".lab"
RUNS = REPO / "runs"
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
INVENTORY = REPO / "inventory" / "lab.yml"
HOSTS = ["mini1", "mini2", "mini3", "pi4", "pi5", "macbook"]
WORKERS = HOSTS[1:]
NAMESPACES = [f"scl-{h}" for h in [*HOSTS, "tb", "wifi"]]
LAB_PREFIXES = ("10.10.0.", "192.168.50.", "192.168.51.", "172.27.83.")
# The Macs' sudo password reaches Ansible from an ansible-vault file, as on the real cluster.
VAULT_FILE, VAULT_PASSWORD = LAB_DIR / "vault.yml", LAB_DIR / "vault-password"
VAULT_ARGS = ("-e", f"@{VAULT_FILE}", "--vault-password-file", str(VAULT_PASSWORD))
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)

# What the machine running the lab needs (iptables: the doctor phase's rules in a lab namespace).
LAB_TOOLS = ("ip", "socat", "ping", "ssh", "systemd-nspawn", "debootstrap", "nsenter", "iptables")
# Phases that passed; a later phase that needs one skips when it did not.
PASSED: set[str] = set()


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces)"
    for tool in LAB_TOOLS:
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            return f"the lab needs {tool} (apt-get install systemd-container debootstrap socat ...)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode:
        return "`ip netns` is not usable here"
    return None


def sh(*argv: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def in_ns(host: str, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", f"scl-{host}", *argv, check=check)


def container_leader(host: str) -> str:
    """The host container's PID 1 as this machine sees it (the child of its systemd-nspawn)."""
    nspawn = (LAB_DIR / "hosts" / host / "nspawn.pid").read_text().strip()
    return sh("pgrep", "-P", nspawn).stdout.split()[0]


def in_host(host: str, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """A command inside the running host container (its mounts, pids and network), as root."""
    return sh("nsenter", "-t", container_leader(host), "-m", "-u", "-i", "-n", "-p", *argv,
              check=check)  # fmt: skip


def host_path(host: str, path: str) -> Path:
    """A file of the host's own filesystem (its overlay, seen from here)."""
    return LAB_DIR / "hosts" / host / "root" / path


def lab_namespaces() -> list[str]:
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("scl-")]


def lab_mounts() -> list[str]:
    """Mount points under the lab's directory (the hosts' overlays)."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    return [m.split()[1] for m in mounts if m.split()[1].startswith(str(LAB_DIR))]


def default_routes() -> dict[str, object]:
    """Default routes of every lab host namespace, and of the root namespace."""
    snap: dict[str, object] = {
        "root": json.loads(sh("ip", "-j", "route", "show", "default", "table", "all").stdout)
    }
    for host in HOSTS:
        out = sh("ip", "-n", f"scl-{host}", "-j", "route", "show", "default", "table", "all")
        snap[host] = json.loads(out.stdout)
    return snap


def root_has_lab_address() -> bool:
    addrs = sh("ip", "-4", "-o", "addr", "show").stdout
    return any(f" {p}" in addrs for p in LAB_PREFIXES)


def ansible_env() -> dict[str, str]:
    return {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}


UNREACHABLE = re.compile(r"^fatal: \[(\S+)\]: UNREACHABLE! => (.*)$", re.M)


def unreachable_report(out: str) -> str:
    """Why Ansible could not reach a host, and what that host's own systemd and sshd say: a
    failing lab test's message shows it first (the recap alone only counts the host)."""
    lines = []
    for host, why in dict(UNREACHABLE.findall(out)).items():
        lines.append(f"{host} unreachable: {why}")
        try:
            state = in_host(host, "systemctl", "is-system-running").stdout.strip()
            sshd = in_host(host, "systemctl", "status", "--no-pager", "-n", "5", "ssh").stdout
            lines += [f"{host} systemd: {state}", sshd]
        except (OSError, IndexError, subprocess.SubprocessError):  # the container is gone
            console = LAB_DIR / "hosts" / host / "console.log"
            tail = console.read_text(errors="replace")[-1500:] if console.exists() else ""
            lines += [f"{host}: its container is not running; console.log ends:", tail]
    return "\n".join(lines)


def playbook(*args: str, timeout: int = 900) -> tuple[dict[str, tuple[int, ...]], str]:
    """Run a playbook over the lab as the login user (become where a task needs it); return the
    recap per host (ok, changed, unreachable, failed) and the output."""
    proc = subprocess.run(
        [str(PLAYBOOK), "-i", str(INVENTORY), *VAULT_ARGS, *args],
        cwd=REPO,
        env=ansible_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        unreachable_report(proc.stdout) + proc.stdout[-6000:] + proc.stderr[-3000:]
    )
    recap = {m[0]: tuple(int(x) for x in m[1:]) for m in RECAP.findall(proc.stdout)}
    assert set(recap) == set(HOSTS), proc.stdout[-3000:]
    assert all(recap[h][2] == 0 and recap[h][3] == 0 for h in HOSTS), recap
    return recap, proc.stdout


def needs(*phases: str) -> None:
    missing = [p for p in phases if p not in PASSED]
    if missing:
        pytest.skip(f"needs the phase(s) {', '.join(missing)}, which did not pass")


def require_lab() -> None:
    reason = unavailable_reason()
    if reason:
        if os.environ.get("SMOLCLUSTER_REQUIRE_LAB") == "1":
            pytest.fail(f"SMOLCLUSTER_REQUIRE_LAB=1 but {reason}")
        pytest.skip(reason)


def wait_for(what: str, ready: Callable[[], bool], timeout: float, proc=None) -> None:
    """Poll until ready(); fail naming `what` on timeout or when proc ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"train.yml ended (rc {proc.returncode}) before: {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for: {what}")
        time.sleep(0.5)


def read_events(path: Path) -> list[Any]:
    """The file's records so far (a line being written is left out); [] before it exists."""
    try:
        return list(read_records(path))
    except FileNotFoundError:
        return []


def host_run_dir(host: str) -> Path:
    """smolcluster_run_dir of a lab host: ~smol/smolcluster/run on the host's own disk."""
    return host_path(host, "home/smol/smolcluster/run")


def cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""  # exited meanwhile


def lab_processes() -> list[str]:
    """Command lines of the jobs' processes (trainers, tmux servers, job scripts) on any host."""
    found = []
    for host in HOSTS:
        for pid in sh("ip", "netns", "pids", f"scl-{host}").stdout.split():
            cmd = cmdline(pid)
            if "smolcluster" in cmd or cmd.startswith("tmux"):
                found.append(f"{host}: {cmd}")
    return found


def host_pid(host: str, pid_in_host: int) -> int:
    """This machine's pid of the process that is `pid_in_host` inside the host's pid namespace."""
    for pid in sh("ip", "netns", "pids", f"scl-{host}").stdout.split():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
        if int(nspid[-1]) == pid_in_host and len(nspid) > 1:
            return int(pid)
    pytest.fail(f"no process {pid_in_host} in {host}")


def test_lab_refuses_when_its_addresses_exist_outside() -> None:
    """Run `up` from a stand-in root namespace holding a lab address: it must refuse."""
    require_lab()
    if lab_namespaces():
        pytest.fail(f"lab namespaces exist already: {lab_namespaces()}")
    guard = "sclguard-test"  # not scl-*: the lab must not count it as its own
    sh("ip", "netns", "add", guard)
    try:
        sh("ip", "-n", guard, "addr", "add", "10.10.0.99/32", "dev", "lo")
        refused = sh("ip", "netns", "exec", guard, str(LAB), "up", check=False)
        assert refused.returncode != 0
        assert "lab address exists in the root namespace" in refused.stderr, refused.stderr
        assert lab_namespaces() == []
    finally:
        sh("ip", "netns", "del", guard, check=False)


def fresh_lab_state() -> None:
    """Start as a clean clone would: fresh hosts (their overlays, so no venv, data, run files,
    units or network state from an earlier lab); host keys under .lab/hosts/<h>/ssh and the
    client key stay."""
    shutil.rmtree(LAB_DIR / "controller", ignore_errors=True)
    for host in HOSTS:
        hdir = LAB_DIR / "hosts" / host
        if hdir.is_dir():
            for entry in hdir.iterdir():
                if entry.name != "ssh":
                    shutil.rmtree(entry, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(
    lab_phase_times: dict[str, tuple[float, str]], keep_degraded_boot: Callable[[str], None]
) -> Iterator[dict[str, object]]:
    """The lab, up for the whole module; always torn down. Yields the default routes of every
    namespace as they were right after `up`."""
    require_lab()
    if lab_namespaces() or lab_mounts():
        pytest.fail(
            f"a lab exists already: {lab_namespaces() + lab_mounts()} (tests/lab/lab.sh down)"
        )
    PASSED.clear()
    started = time.monotonic()
    fresh_lab_state()
    lab_phase_times["lab fresh state"] = (time.monotonic() - started, "passed")
    try:
        started = time.monotonic()
        # A cold machine builds the rootfs and the wheel mirror first (minutes, once).
        up = sh(str(LAB), "up", check=False, timeout=1200)
        lab_phase_times["lab up"] = (
            time.monotonic() - started,
            "passed" if up.returncode == 0 else "failed",
        )
        assert up.returncode == 0, up.stderr
        print(up.stderr)  # what up built and how long it took, in the captured log
        keep_degraded_boot(up.stderr)
        before = default_routes()
        assert all(before[h] for h in HOSTS), "every lab host starts with a Wi-Fi default route"
        yield before
    finally:
        started = time.monotonic()
        down = sh(str(LAB), "down", check=False, timeout=300)
        lab_phase_times["lab down"] = (
            time.monotonic() - started,
            "passed" if down.returncode == 0 else "failed",
        )
        assert down.returncode == 0, down.stderr
        assert lab_namespaces() == []
        assert lab_mounts() == []
        # ... nor the tmpfs up mounted for systemd-nspawn's own state.
        assert " /run/systemd/nspawn " not in Path("/proc/mounts").read_text()


def test_lab_refuses_a_second_start(lab: dict[str, object]) -> None:
    again = sh(str(LAB), "up", check=False)
    assert again.returncode != 0
    assert "already exist" in again.stderr
    assert sorted(lab_namespaces()) == sorted(NAMESPACES)


LAB_UNITS = {
    # The unit as Debian ships it, failing once: the boot's /run/nologin stays.
    "systemd-user-sessions.service.d/fail.conf": "[Service]\nExecStartPre=/bin/sh -c "
    "'[ -e /var/lib/lab-sessions-failed ] || { touch /var/lib/lab-sessions-failed; "
    "echo lab: failing once >&2; exit 1; }'\n",
    # Exits once as systemd's own 219/CGROUP does (it could not place the process).
    "lab-cgroup-once.service": "[Service]\nType=oneshot\nExecStart=/bin/sh -c "
    "'[ -e /var/lib/lab-cgroup-failed ] || { touch /var/lib/lab-cgroup-failed; exit 219; }'\n"
    "[Install]\nWantedBy=multi-user.target\n",
    # Fails for its own reason, every time: it must be left failed, and started only once.
    "lab-fails.service": "[Service]\nType=oneshot\n"
    "ExecStart=/bin/sh -c 'echo run >> /var/lib/lab-fails.runs; exit 3'\n"
    "[Install]\nWantedBy=multi-user.target\n",
}


@pytest.mark.timeout(300)
def test_a_boot_that_locks_users_out_is_reported_and_mended(lab: dict[str, object]) -> None:
    """CI once had mini1's systemd-user-sessions fail at boot: /run/nologin stayed, the login
    user was refused and the whole lab failed with no reason; another run had pi4's
    systemd-remount-fs fail with 219/CGROUP. The macbook (nothing configured on it yet) boots
    with both kinds failing once and a unit that always fails: `boot` names all three with their
    journal lines, starts the first two again, leaves the third failed, and the login user gets
    in."""
    units = host_path("macbook", "etc/systemd/system")
    wants = units / "multi-user.target.wants"
    made = [units / name for name in LAB_UNITS]
    made += [wants / "lab-cgroup-once.service", wants / "lab-fails.service"]
    marks = [host_path("macbook", f"var/lib/{m}") for m in
             ("lab-sessions-failed", "lab-cgroup-failed", "lab-fails.runs")]  # fmt: skip
    off = sh(str(LAB), "poweroff", "macbook", check=False, timeout=120)
    assert off.returncode == 0, off.stderr
    try:
        for name, text in LAB_UNITS.items():
            (units / name).parent.mkdir(parents=True, exist_ok=True)
            (units / name).write_text(text)
        wants.mkdir(parents=True, exist_ok=True)
        for name in ("lab-cgroup-once.service", "lab-fails.service"):
            (wants / name).unlink(missing_ok=True)
            (wants / name).symlink_to(f"/etc/systemd/system/{name}")
        for mark in marks:
            mark.unlink(missing_ok=True)
        boot = sh(str(LAB), "boot", "macbook", check=False, timeout=180)
        assert boot.returncode == 0, boot.stderr
        assert (
            "macbook booted degraded: lab-cgroup-once.service lab-fails.service "
            "systemd-user-sessions.service" in boot.stderr
        ), boot.stderr
        assert "lab: failing once" in boot.stderr  # the units' own journal lines
        assert "status=219/CGROUP" in boot.stderr
        for unit in ("systemd-user-sessions.service", "lab-cgroup-once.service"):
            assert f"macbook: starting {unit} again" in boot.stderr, boot.stderr
            assert in_host("macbook", "systemctl", "is-failed", unit).returncode != 0
        assert "starting lab-fails.service" not in boot.stderr, boot.stderr
        assert in_host("macbook", "systemctl", "is-failed", "lab-fails.service").returncode == 0
        assert marks[2].read_text() == "run\n"  # started by its boot only
        assert in_host("macbook", "test", "-e", "/run/nologin").returncode == 1
    finally:
        # The macbook as shipped again, not degraded, for the phases that follow.
        for path in made + marks:
            path.unlink(missing_ok=True)
        in_host("macbook", "systemctl", "daemon-reload")
        in_host("macbook", "systemctl", "reset-failed")


def check_cluster_routing(before: dict[str, object]) -> None:
    """What the network role must have set, seen from inside the namespaces."""
    # pi4 reaches the server's fabric address through mini3, exactly one hop away.
    route = in_ns("pi4", "ip", "route", "get", "10.10.0.1").stdout
    assert "via 192.168.51.2" in route, route
    hop = in_ns("pi4", "ping", "-c1", "-W1", "-t1", "10.10.0.1")
    assert hop.returncode != 0 and "From 192.168.51.2" in hop.stdout, hop.stdout
    assert "exceeded" in hop.stdout, hop.stdout
    assert in_ns("pi4", "ping", "-c1", "-W1", "-t2", "10.10.0.1").returncode == 0
    # pi5 likewise through mini1; both Pis reach the other Macs on the fabric.
    assert "via 192.168.50.1" in in_ns("pi5", "ip", "route", "get", "10.10.0.1").stdout
    for host, target in [
        ("pi4", "10.10.0.3"),
        ("pi5", "10.10.0.2"),
        ("mini2", "10.10.0.1"),
        ("mini1", "192.168.50.2"),
        ("mini3", "192.168.51.4"),
    ]:
        assert in_ns(host, "ping", "-c1", "-W1", target).returncode == 0, (host, target)
    # The Pis stay isolated from each other's link.
    for host, target in [
        ("pi4", "192.168.50.1"),
        ("pi4", "192.168.50.2"),
        ("pi5", "192.168.51.2"),
        ("pi5", "192.168.51.4"),
    ]:
        assert in_ns(host, "ping", "-c1", "-W1", target).returncode != 0, (host, target)
    for host in ("mini1", "mini3"):
        assert in_ns(host, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert in_ns("mini2", "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    assert default_routes() == before
    assert not root_has_lab_address()


@pytest.mark.timeout(600)
def test_preflight_fails_first_naming_the_host(lab: dict[str, object]) -> None:
    """Broken on purpose on a fresh lab: a wrong sudo password (the Macs), pi4's cable device
    missing (renamed), pi5's Wi-Fi on the subnet of its cluster cable (many routers' factory
    LAN). Preflight names each host and what is wrong, and nothing has changed anywhere."""
    sh("ip", "-n", "scl-pi4", "link", "set", "eth0", "down")  # (a link is renamed down)
    sh("ip", "-n", "scl-pi4", "link", "set", "eth0", "name", "eth7")
    sh("ip", "-n", "scl-pi5", "addr", "add", "192.168.50.77/24", "dev", "wlan0")
    try:
        proc = subprocess.run(
            [str(PLAYBOOK), "-i", str(INVENTORY), *VAULT_ARGS, "site.yml", "--tags", "preflight",
             "-e", "vault_macs_become_password=not-the-password"],
            cwd=REPO, env=ansible_env(), capture_output=True, text=True, timeout=540, check=False,
        )  # fmt: skip
    finally:
        sh("ip", "-n", "scl-pi5", "addr", "del", "192.168.50.77/24", "dev", "wlan0")
        sh("ip", "-n", "scl-pi4", "link", "set", "eth7", "name", "eth0")
    out = proc.stdout
    assert proc.returncode != 0, out[-4000:]
    recap = {m[0]: tuple(int(x) for x in m[1:]) for m in RECAP.findall(out)}
    failed = {h for h in HOSTS if recap[h][3] > 0}
    # The MacBook has nothing for the network role, so it needs no sudo at all.
    assert failed == {"mini1", "mini2", "mini3", "pi4", "pi5"}, (
        f"{recap}\n{unreachable_report(out)}"
    )
    for mac in ("mini1", "mini2", "mini3"):
        assert re.search(rf"{mac}: become \(sudo\) does not work for smol", out), out[-6000:]
    assert re.search(r"pi4: .*eth0.*(does not exist|missing|not found)", out), out[-6000:]
    assert re.search(r"pi5: .*192\.168\.50\.0/24.*overlap", out), out[-6000:]
    # Nothing changed on any host: no state, no address, no profile.
    for host in HOSTS:
        assert not host_path(host, "var/lib/smolcluster-network").exists(), host
        assert "10.10.0." not in in_ns(host, "ip", "-4", "-o", "addr").stdout, host


@pytest.mark.timeout(900)
def test_site_sets_up_the_cluster_and_its_routes(lab: dict[str, object]) -> None:
    # The lab starts bare: no cluster address anywhere, so the network role has real work.
    assert "10.10.0." not in in_ns("mini1", "ip", "-4", "-o", "addr").stdout
    # A rival DHCP profile on each Pi's cable, keener than NetworkManager's default (as Pi OS
    # trixie's netplan/cloud-init profiles can be): ours must outrank it, at boot too.
    for pi in ("pi4", "pi5"):
        in_host(pi, "nmcli", "connection", "add", "type", "ethernet", "ifname", "eth0",
                "con-name", "rival-dhcp", "ipv4.method", "auto",
                "connection.autoconnect-priority", "150", check=True)  # fmt: skip
    recap, _ = playbook("site.yml")
    assert recap["pi4"][1] > 0 and recap["mini1"][1] > 0
    check_cluster_routing(lab)
    for pi, link, address, route in [
        ("pi4", "edge51", "192.168.51.4/24", "10.10.0.0/24 192.168.51.2"),
        ("pi5", "edge50", "192.168.50.2/24", "10.10.0.0/24 192.168.50.1"),
    ]:
        fields = ",".join(["connection.autoconnect-priority", "ipv4.method", "ipv4.never-default",
                           "ipv4.addresses", "ipv4.routes"])  # fmt: skip
        profile = in_host(pi, "nmcli", "-g", fields, "connection", "show", f"smolcluster-{link}")
        assert profile.stdout.split() == ["151", "manual", "yes", address, *route.split()], profile
    # The gateways' persistence lives in their own /etc, and the boot unit is enabled.
    for gateway in ("mini1", "mini3"):
        assert host_path(gateway, "etc/sysctl.d/90-smolcluster.conf").is_file()
        assert host_path(gateway, "etc/smolcluster-network/ip.batch").is_file()
        enabled = in_host(gateway, "systemctl", "is-enabled", "smolcluster-network.service")
        assert enabled.stdout.strip() == "enabled", enabled
    PASSED.add("site")


@pytest.mark.timeout(900)
def test_second_site_changes_nothing(lab: dict[str, object]) -> None:
    needs("site")
    recap, out = playbook("site.yml")
    changed = {h: recap[h][1] for h in HOSTS}
    assert changed == dict.fromkeys(HOSTS, 0), out[-6000:]


@pytest.mark.timeout(600)
def test_doctor_says_ok_then_names_each_broken_host(lab: dict[str, object]) -> None:
    """doctor.yml after site.yml: one ok line per host and changed=0. Then, broken on purpose:
    pi4's route to the fabric deleted, mini2 holding another cluster secret, mini3's packets to
    the server's port answered with a reset (what a stopped port answers) and pi5's silently
    dropped, both by iptables rules inside mini1's namespace. `train.yml -e doctor=true` fails
    before any job starts, with the right cause on each of the four lines and ok on the rest."""
    needs("site")
    recap, out = playbook("doctor.yml")
    assert doctor_lines(out) == dict.fromkeys(HOSTS, "ok"), out[-4000:]
    assert {h: recap[h][1] for h in HOSTS} == dict.fromkeys(HOSTS, 0), recap

    secret = host_path("mini2", "home/smol/smolcluster/config/secret")
    original = secret.read_text()
    port = "65432"
    rules = [
        ["-s", "10.10.0.3", "-j", "REJECT", "--reject-with", "tcp-reset"],
        ["-s", "192.168.50.2", "-j", "DROP"],
    ]
    sh("ip", "-n", "scl-pi4", "route", "del", "10.10.0.0/24")
    secret.write_text(os.urandom(32).hex() + "\n")
    for rule in rules:
        in_ns("mini1", "iptables", "-I", "INPUT", "-p", "tcp", "--dport", port, *rule, check=True)
    try:
        proc = subprocess.run(
            [str(PLAYBOOK), "-i", str(INVENTORY), *VAULT_ARGS, "train.yml", "-e", "doctor=true",
             "-e", "epochs=1"],
            cwd=REPO, env=ansible_env(), capture_output=True, text=True, timeout=540, check=False,
        )  # fmt: skip
    finally:
        for rule in rules:
            in_ns("mini1", "iptables", "-D", "INPUT", "-p", "tcp", "--dport", port, *rule)
        secret.write_text(original)
        # NetworkManager puts its profile's route back.
        in_host("pi4", "nmcli", "connection", "up", "smolcluster-edge51", check=True)
    out = proc.stdout
    assert proc.returncode != 0, out[-4000:]
    lines = doctor_lines(out)
    assert lines["mini1"] == "ok" and lines["macbook"] == "ok", lines
    assert lines["pi4"].startswith(
        "routes: pi4: 10.10.0.0/24 should be routed via 192.168.51.2, but 10.10.0.1 goes via "
        "172.27.83.1 dev wlan0: the cluster route is missing; fix: run site.yml"
    ), lines
    assert lines["mini2"].startswith("handshake: mini2 reached 10.10.0.1:65432 but"), lines
    assert "cluster secret differs from the server's" in lines["mini2"], lines
    assert lines["mini3"].startswith(
        "handshake: mini3 cannot connect to 10.10.0.1:65432: [Errno 111] ECONNREFUSED"
    ), lines
    assert lines["pi5"].startswith(
        "handshake: pi5 cannot connect to 192.168.50.1:65432: [Errno 110] ETIMEDOUT"
    ), lines
    assert "packets dropped: a firewall" in lines["pi5"], lines
    # train.yml stopped at the doctor: no job started anywhere.
    assert lab_processes() == [], lab_processes()
    assert "via 192.168.51.2" in in_ns("pi4", "ip", "route", "get", "10.10.0.1").stdout
    PASSED.add("doctor")


@pytest.mark.timeout(900)
def test_train_one_epoch_over_every_worker(lab: dict[str, object]) -> None:
    needs("site")
    run_id = time.strftime("lab-sync-%Y%m%dT%H%M%SZ", time.gmtime())
    _, out = playbook("train.yml", "-e", "epochs=1", "-e", f"run_id={run_id}")
    fetched = RUNS / run_id
    for host in HOSTS:
        assert (fetched / host / f"{host}.log").stat().st_size > 0, host
        assert (fetched / host / f"{host}.exit").read_text().strip() == "0", host
        assert any(e["event"] == "summary" for e in read_events(fetched / host / f"{host}.jsonl"))
    events = read_events(fetched / "mini1" / "mini1.jsonl")
    start = next(e for e in events if e["event"] == "start")
    summary = next(e for e in events if e["event"] == "summary")
    assert start["mode"] == "sync" and start["workers"] == len(WORKERS)
    assert summary["steps"] == start["total_steps"] > 0
    assert sorted(summary["workers"]) == sorted(WORKERS)
    assert all(w["steps"] == summary["steps"] for w in summary["workers"].values())
    assert 0.5 < summary["final_accuracy"] <= 1.0
    assert (fetched / "report.png").stat().st_size > 0
    assert f"report: {fetched / 'report.png'}" in out  # the logs role printed the summary
    # pi4's job ran as a systemd unit of pi4's own systemd, as the login user; the others in tmux.
    unit = in_host("pi4", "systemctl", "show", "-p", "User,Result,ExecMainStatus",
                   "smolcluster-pi4.service").stdout  # fmt: skip
    assert "User=smol" in unit and "Result=success" in unit and "ExecMainStatus=0" in unit, unit
    PASSED.add("train")


@pytest.mark.timeout(600)
def test_rebooted_hosts_come_back_by_themselves(
    lab: dict[str, object], keep_degraded_boot: Callable[[str], None]
) -> None:
    """Power-cycle a Pi (NetworkManager profiles) and the gateway Mac of the other Pi (iproute2
    boot unit, forwarding from sysctl.d): their links, routes and forwarding come back with no
    Ansible run. The elastic phase then trains on both with no second site.yml."""
    needs("site")
    off = sh(str(LAB), "poweroff", "pi5", "mini3", check=False, timeout=120)
    assert off.returncode == 0, off.stderr
    # Powered off, the hosts' links hold nothing any more: whatever comes back, boot brings.
    assert "192.168.50.2" not in in_ns("pi5", "ip", "-4", "-o", "addr").stdout
    assert "192.168.51.2" not in in_ns("mini3", "ip", "-4", "-o", "addr").stdout
    assert in_ns("mini3", "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    assert in_ns("pi4", "ping", "-c1", "-W1", "10.10.0.1").returncode != 0
    boot = sh(str(LAB), "boot", "pi5", "mini3", check=False, timeout=300)
    assert boot.returncode == 0, boot.stderr
    keep_degraded_boot(boot.stderr)
    for host in ("pi5", "mini3"):
        assert in_host(host, "systemctl", "is-system-running").stdout.strip() in {
            "running",
            "degraded",
        }
    # NetworkManager brought pi5's profile up at boot; mini3's unit replayed its links.
    active = in_host("pi5", "nmcli", "-t", "-f", "NAME,DEVICE", "connection", "show", "--active")
    assert "smolcluster-edge50:eth0" in active.stdout.splitlines(), active.stdout
    unit = in_host("mini3", "systemctl", "is-active", "smolcluster-network.service").stdout.strip()
    assert unit == "active", unit

    def routed() -> bool:
        return (
            in_ns("pi4", "ping", "-c1", "-W1", "10.10.0.1").returncode == 0
            and in_ns("pi5", "ping", "-c1", "-W1", "10.10.0.2").returncode == 0
        )

    wait_for("both Pis reaching the fabric again", routed, 60)
    check_cluster_routing(lab)
    PASSED.add("reboot")


def server_log() -> str:
    try:
        return (host_run_dir("mini1") / "mini1.log").read_text()
    except OSError:
        return ""


@pytest.mark.timeout(900)
def test_elastic_run_survives_a_pulled_cable_and_a_killed_worker(
    lab: dict[str, object], tmp_path: Path
) -> None:
    """pi5's cable is pulled (its peer end on mini1 goes down, so pi5 loses carrier and keeps
    its routes, as with a real cable) until the server evicts pi5, then plugged back: pi5
    reconnects, rejoins and finishes. Then mini2's worker is killed: the run still completes,
    and train.yml, which treats an elastic worker leaving as part of the mode, succeeds."""
    needs("site", "reboot")
    run_id = time.strftime("lab-elastic-%Y%m%dT%H%M%SZ", time.gmtime())
    # Throttled steps make the run last (~1 min) on sleep, not CPU; all five workers must join
    # before it starts (min_workers), so every one of them trains before the faults.
    extra = {
        "trainer_worker_update_interval": 5,
        "trainer_cluster_extra": {
            "heartbeat_timeout_s": 8,
            "throttle_s": dict.fromkeys(WORKERS, 0.5),
        },
    }
    args = [
        "train.yml",
        "-e", "mode=elastic", "-e", "epochs=1", "-e", "heartbeat_interval_s=1",
        "-e", f"min_workers={len(WORKERS)}", "-e", f"run_id={run_id}", "-e", json.dumps(extra),
    ]  # fmt: skip
    metrics = host_run_dir("mini1") / "mini1.jsonl"
    metrics.unlink(missing_ok=True)  # the role clears the run directory too; never read stale
    output = tmp_path / "train-elastic.out"
    with output.open("w") as sink:
        proc = subprocess.Popen(
            [str(PLAYBOOK), "-i", str(INVENTORY), *VAULT_ARGS, *args],
            cwd=REPO,
            env=ansible_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    cable_out = False
    try:

        def pushed() -> set[str]:
            return {e.get("host") for e in read_events(metrics) if e["event"] == "step"}

        wait_for("every worker's first push", lambda: set(WORKERS) <= pushed(), 600, proc)

        sh("ip", "-n", "scl-mini1", "link", "set", "edge50", "down")
        cable_out = True
        assert in_ns("pi5", "ping", "-c1", "-W1", "10.10.0.1").returncode != 0
        wait_for(
            "the server evicting pi5",
            lambda: re.search(r"dropped pi5\(rank \d\): silent", server_log()) is not None,
            60,
            proc,
        )
        sh("ip", "-n", "scl-mini1", "link", "set", "edge50", "up")
        cable_out = False
        wait_for(
            "pi5 rejoining",
            lambda: len(re.findall(r"pi5\(rank \d\) starts at version", server_log())) >= 2,
            120,
            proc,
        )

        # The pid file holds the pid inside mini2's own pid namespace.
        pid = host_pid("mini2", int((host_run_dir("mini2") / "mini2.pid").read_text()))
        assert "smolcluster worker" in cmdline(str(pid)), cmdline(str(pid))
        os.kill(pid, signal.SIGKILL)
        wait_for(
            "the server dropping mini2",
            lambda: re.search(r"dropped mini2\(rank \d\)", server_log()) is not None,
            60,
            proc,
        )
        proc.wait(timeout=600)
    finally:
        if cable_out:
            sh("ip", "-n", "scl-mini1", "link", "set", "edge50", "up", check=False)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = output.read_text()
    assert proc.returncode == 0, out[-6000:]
    assert "the job of mini2" in out and "ended early" in out, out[-4000:]

    fetched = RUNS / run_id
    events = read_events(fetched / "mini1" / "mini1.jsonl")
    start = next(e for e in events if e["event"] == "start")
    summary = next(e for e in events if e["event"] == "summary")
    assert start["mode"] == "elastic"
    # The sample budget of a sync run of the same plan was met: the run completed.
    assert summary["samples"] >= start["total_steps"] * len(WORKERS) * 32
    assert sorted(summary["workers"]) == sorted(WORKERS)
    assert summary["workers"]["pi5"]["connections"] >= 2
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    pi5_log = (fetched / "pi5" / "pi5.log").read_text()
    assert "reconnecting" in pi5_log and "server finished the run" in pi5_log, pi5_log[-3000:]
    assert (fetched / "pi5" / "pi5.exit").read_text().strip() == "0"
    assert (fetched / "mini2" / "mini2.exit").read_text().strip() != "0"
    for host in ("mini1", "mini3", "pi4", "macbook"):
        assert (fetched / host / f"{host}.exit").read_text().strip() == "0", host
    PASSED.add("elastic")


@pytest.mark.timeout(600)
def test_teardown_stops_everything_and_restores_the_network(lab: dict[str, object]) -> None:
    """Nothing of ours is left on any host: no job, unit, profile, address, route or file."""
    playbook("teardown.yml", "-e", "restore_network=true", "-e", "purge=true")
    assert lab_processes() == []
    for host in ("mini1", "mini2", "mini3", "pi4", "pi5"):
        addrs = in_ns(host, "ip", "-4", "-o", "addr").stdout
        assert "10.10.0." not in addrs and "192.168.5" not in addrs, (host, addrs)
        assert "10.10.0.0/24" not in in_ns(host, "ip", "route").stdout
        assert in_ns(host, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
        assert not host_path(host, "etc/smolcluster-network").exists()
        # No unit of ours is left loaded or on disk, on any host's own systemd.
        units = in_host(host, "systemctl", "list-units", "--all", "--plain", "--no-legend",
                        "smolcluster*").stdout  # fmt: skip
        assert units.strip() == "", (host, units)
        assert not list(host_path(host, "etc/systemd/system").glob("smolcluster*")), host
    for host in ("pi4", "pi5"):
        profiles = in_host(host, "nmcli", "-t", "-f", "NAME", "connection", "show").stdout
        assert "smolcluster-" not in profiles, (host, profiles)
        assert "rival-dhcp" in profiles.splitlines(), (host, profiles)  # theirs stays theirs
    for host in HOSTS:
        assert not host_path(host, "home/smol/smolcluster").exists(), host  # purge=true
    assert in_ns("pi4", "ping", "-c1", "-W1", "10.10.0.1").returncode != 0
    assert default_routes() == lab
    assert not root_has_lab_address()
