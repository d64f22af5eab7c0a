"""End to end on the namespace lab: the real network role over SSH, then routing checked from
inside the namespaces (never from the root namespace).

Needs root, `ip netns`, sshd, socat, ping and tmux; skips with the reason otherwise, unless
SMOLCLUSTER_REQUIRE_LAB=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "tests" / "lab" / "lab.sh"
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
INVENTORY = REPO / "inventory" / "lab.yml"
HOSTS = ["mini1", "mini2", "mini3", "pi4", "pi5", "macbook"]
NAMESPACES = [f"scl-{h}" for h in [*HOSTS, "tb", "wifi"]]
LAB_PREFIXES = ("10.10.0.", "192.168.50.", "192.168.51.", "172.27.83.")
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces)"
    for tool in ("ip", "sshd", "socat", "ping", "tmux", "ssh"):
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            return f"the lab needs {tool} (apt-get install iproute2 openssh-server socat ...)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode:
        return "`ip netns` is not usable here"
    return None


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120)


def in_ns(host: str, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", f"scl-{host}", *argv, check=check)


def lab_namespaces() -> list[str]:
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("scl-")]


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


def playbook(name: str) -> dict[str, tuple[int, int, int, int]]:
    """Run a playbook over the lab; return the recap (ok, changed, unreachable, failed)."""
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    proc = subprocess.run(
        [str(PLAYBOOK), "-i", str(INVENTORY), str(REPO / "tests" / "lab" / name)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    recap = {m[0]: tuple(int(x) for x in m[1:]) for m in RECAP.findall(proc.stdout)}
    assert set(recap) == set(HOSTS), proc.stdout[-3000:]
    return recap  # type: ignore[return-value]


def require_lab() -> None:
    reason = unavailable_reason()
    if reason:
        if os.environ.get("SMOLCLUSTER_REQUIRE_LAB") == "1":
            pytest.fail(f"SMOLCLUSTER_REQUIRE_LAB=1 but {reason}")
        pytest.skip(reason)


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


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    require_lab()
    if lab_namespaces():
        pytest.fail(f"lab namespaces exist already: {lab_namespaces()} (tests/lab/lab.sh down)")
    try:
        up = sh(str(LAB), "up", check=False)
        assert up.returncode == 0, up.stderr
        yield
    finally:
        down = sh(str(LAB), "down", check=False)
        assert down.returncode == 0, down.stderr
        assert lab_namespaces() == []


def test_lab_refuses_a_second_start(lab: None) -> None:
    again = sh(str(LAB), "up", check=False)
    assert again.returncode != 0
    assert "already exist" in again.stderr
    assert sorted(lab_namespaces()) == sorted(NAMESPACES)


# Three role runs and a restore over SSH: ~4 min on an idle 2-core box, ~14 min under heavy load.
@pytest.mark.timeout(1200)
def test_network_role_end_to_end(lab: None) -> None:
    before = default_routes()
    assert all(before[h] for h in HOSTS), "every lab host starts with a Wi-Fi default route"
    # The lab starts bare: no cluster address anywhere, so the role has real work to do.
    assert "10.10.0." not in in_ns("mini1", "ip", "-4", "-o", "addr").stdout

    first = playbook("network.yml")
    assert all(first[h][2] == 0 and first[h][3] == 0 for h in HOSTS)
    assert first["pi4"][1] > 0 and first["mini1"][1] > 0

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

    second = playbook("network.yml")
    assert {h: second[h][1] for h in HOSTS} == dict.fromkeys(HOSTS, 0)

    restored = playbook("network-restore.yml")
    assert all(restored[h][3] == 0 for h in HOSTS)
    for host in ("mini1", "mini2", "mini3", "pi4", "pi5"):
        addrs = in_ns(host, "ip", "-4", "-o", "addr").stdout
        assert "10.10.0." not in addrs and "192.168.5" not in addrs, (host, addrs)
        assert "10.10.0.0/24" not in in_ns(host, "ip", "route").stdout
        assert in_ns(host, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
        assert not (REPO / ".lab" / "hosts" / host / "etc" / "smolcluster-network").exists()
    assert in_ns("pi4", "ping", "-c1", "-W1", "10.10.0.1").returncode != 0
    assert default_routes() == before
    assert not root_has_lab_address()


def lab_processes() -> list[str]:
    """Command lines of every process inside the lab host namespaces except sshd itself."""
    found = []
    for host in HOSTS:
        for pid in sh("ip", "netns", "pids", f"scl-{host}").stdout.split():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue  # exited meanwhile
            # sshd and the ProxyCommand ends of open SSH connections are the lab's own transport.
            if not cmd.startswith(("/usr/sbin/sshd", "sshd", "socat STDIO TCP:127.0.0.1:22")):
                found.append(f"{host}: {cmd.strip()}")
    return found


def root_playbook(*args: str) -> dict[str, tuple[int, int, int, int]]:
    """Run one of the root playbooks (site/train/teardown) over the lab; return the recap."""
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    proc = subprocess.run(
        [str(PLAYBOOK), "-i", str(INVENTORY), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return {m[0]: tuple(int(x) for x in m[1:]) for m in RECAP.findall(proc.stdout)}  # type: ignore[misc]


@pytest.mark.skipif(
    os.environ.get("SMOLCLUSTER_LAB_FULL") != "1",
    reason="the full site/train/teardown cycle over the lab takes long; set SMOLCLUSTER_LAB_FULL=1",
)
@pytest.mark.timeout(3600)
def test_site_train_teardown_over_lab(lab: None) -> None:
    before = default_routes()
    root_playbook("site.yml")
    assert "via 192.168.51.2" in in_ns("pi4", "ip", "route", "get", "10.10.0.1").stdout
    again = root_playbook("site.yml")
    assert {h: again[h][1] for h in HOSTS} == dict.fromkeys(HOSTS, 0)
    root_playbook("train.yml", "-e", "epochs=1")
    root_playbook("teardown.yml", "-e", "restore_network=true")
    assert lab_processes() == []
    assert "10.10.0." not in in_ns("mini1", "ip", "-4", "-o", "addr").stdout
    assert default_routes() == before
    assert not root_has_lab_address()
