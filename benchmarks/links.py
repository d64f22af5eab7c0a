"""The benchmark modes across shaped links, in throwaway network namespaces (root only).

    sudo .venv/bin/python -m benchmarks.run --links all --workers 3 --steps 60

Its OWN namespaces (prefix `sclbench-<pid>-`, never the lab's `scl-`): a bridge namespace (the
switch) and one per host, each joined to it by a veth with 10.10.0.<i+1>/24 as on the cluster's
Thunderbolt fabric. Both ends of a veth are created inside their namespaces, so the root
namespace never gets an address or route of that subnet (the network rule). A profile shapes
both ends of every veth with `tbf` (rate only: this kernel has no sch_netem for delay).
Teardown kills every process in each namespace and deletes it however the run ends (SIGTERM
and SIGHUP raise SystemExit); namespaces of a SIGKILLed run go at the next start.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks.common import fmt, slug, table
from benchmarks.runs import RunResult, end_to_end_table
from smolcluster.harness import SERVER, worker_names

PREFIX = "sclbench-"
SUBNET = "10.10.0"  # the cluster fabric's subnet, only ever inside our namespaces
IFNAME = "eth0"  # a host's veth, inside its namespace
TBF_LATENCY_MS = 50  # tbf queue: packets waiting longer than this are dropped
MIN_BURST = 64 * 1024  # >= one GSO segment; tbf splits bigger ones


@dataclass(frozen=True)
class Profile:
    key: str
    label: str
    rate_mbit: float | None  # None: unshaped

    def burst_bytes(self) -> int:
        """tbf bucket: 1 ms at the rate, at least 64 KiB (small next to a step's MBs)."""
        assert self.rate_mbit is not None
        return max(MIN_BURST, int(self.rate_mbit * 1e6 / 8 / 1000))

    @property
    def rate_bytes_per_s(self) -> float:
        return float("inf") if self.rate_mbit is None else self.rate_mbit * 1e6 / 8


PROFILES: dict[str, Profile] = {
    p.key: p
    for p in (
        Profile("veth", "unshaped veth", None),
        Profile("tb", "Thunderbolt 10gbit", 10_000),
        Profile("gbe", "GbE 940mbit", 940),
        Profile("wifi", "Wi-Fi 200mbit", 200),
    )
}


def choose_profiles(names: list[str]) -> list[Profile]:
    if "all" in names:
        return list(PROFILES.values())
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise ValueError(f"unknown link profile(s) {unknown}; choose from {[*PROFILES, 'all']}")
    return [PROFILES[n] for n in dict.fromkeys(names)]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def unavailable_reason() -> str | None:
    """None when this process can build namespaces and shape links, else why not."""
    if os.geteuid() != 0:
        return "--links needs root (it creates network namespaces); run it with sudo"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"--links needs `{tool}` (apt-get install iproute2)"
    if _run("ip", "netns", "list", check=False).returncode:
        return "`ip netns` is not usable here"
    return None


def our_namespaces(prefix: str = PREFIX) -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def root_uses_subnet() -> str | None:
    """A root-namespace address or route in our subnet: refuse, it would mix with real traffic."""
    addrs = _run("ip", "-4", "-o", "addr", "show").stdout
    if f" {SUBNET}." in addrs:
        return f"the root namespace has an address in {SUBNET}.0/24"
    for line in _run("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        if any(word.startswith(f"{SUBNET}.") for word in line.split()):
            return f"the root namespace has a route into {SUBNET}.0/24: {line.strip()}"
    return None


def kill_and_delete(names: list[str]) -> list[str]:
    """Kill every process in each namespace, then delete it; returns the ones left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = False
        for ns in names:
            for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
                alive = True
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), sig)
        if not alive:
            break
        time.sleep(0.5)
    for ns in names:
        _run("ip", "netns", "del", ns, check=False)
    existing = set(our_namespaces())
    return [ns for ns in names if ns in existing]


def remove_stale() -> None:
    """Namespaces of an earlier run whose process is gone (killed with SIGKILL, say)."""
    owners = {ns: ns[len(PREFIX) :].split("-", 1)[0] for ns in our_namespaces()}
    kill_and_delete([ns for ns, pid in owners.items() if not Path(f"/proc/{pid}").exists()])


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally, then Fabric.__exit__


class Fabric:
    """A bridge namespace and `hosts` host namespaces; a context manager that always tears down.

    Host i lives in `ns(i)` with address `addr(i)` on its `eth0`; its cable's switch end is
    `h<i>` in the bridge namespace.
    """

    def __init__(self, hosts: int) -> None:
        self.hosts = hosts
        self.tag = f"{PREFIX}{os.getpid()}-"
        self.bridge = f"{self.tag}br"
        self._up = False

    def ns(self, i: int) -> str:
        return f"{self.tag}h{i}"

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def names(self) -> list[str]:
        return [self.bridge, *(self.ns(i) for i in range(self.hosts))]

    def __enter__(self) -> Fabric:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        reason = unavailable_reason() or root_uses_subnet()
        if reason:
            raise RuntimeError(reason)
        remove_stale()
        if our_namespaces(self.tag):
            raise RuntimeError(f"namespaces {our_namespaces(self.tag)} exist already")
        self._up = True
        br = self.bridge
        _run("ip", "netns", "add", br)
        _run("ip", "-n", br, "link", "set", "lo", "up")
        _run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", br, "link", "set", "br0", "up")
        for i in range(self.hosts):
            ns, port = self.ns(i), f"h{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            # Both ends are created directly inside their namespaces: never in the root one.
            _run("ip", "link", "add", IFNAME, "netns", ns, "type", "veth",
                 "peer", "name", port, "netns", br)  # fmt: skip
            _run("ip", "-n", br, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", IFNAME)
            _run("ip", "-n", ns, "link", "set", IFNAME, "up")
        # No wait for the bridge to forward: the workers' dial and gloo's store retry.

    def _ends(self) -> dict[str, tuple[str, str]]:
        """(namespace, device) of both ends of every host's cable: 'h<i> up' sends host ->
        switch, 'h<i> down' switch -> host."""
        ends = {}
        for i in range(self.hosts):
            ends |= {f"h{i} up": (self.ns(i), IFNAME), f"h{i} down": (self.bridge, f"h{i}")}
        return ends

    def apply(self, profile: Profile) -> str:
        """Shape every cable end with `profile`; returns how (printed with the table)."""
        for ns, dev in self._ends().values():
            _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
        if profile.rate_mbit is None:
            return "none (veth default qdisc, no shaping, no delay)"
        rate, burst = f"{profile.rate_mbit:g}mbit", profile.burst_bytes()
        spec = ["tbf", "rate", rate, "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]
        for ns, dev in self._ends().values():
            _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *spec)
        return (
            f"tbf rate {rate} burst {burst} latency {TBF_LATENCY_MS}ms on both ends of every "
            "host's veth; rate only, NO added delay (no sch_netem)"
        )

    def qdisc_bytes(self) -> dict[str, int]:
        """Bytes each cable end's root qdisc has sent, every byte on the wire (headers too)."""
        out: dict[str, int] = {}
        for end, (ns, dev) in self._ends().items():
            shown = _run("tc", "-s", "-j", "-n", ns, "qdisc", "show", "dev", dev).stdout
            roots = [q for q in json.loads(shown or "[]") if q.get("root")]
            out[end] = int(roots[0]["bytes"]) if roots else 0
        return out

    def down(self) -> None:
        if not self._up:
            return
        left = kill_and_delete(self.names())
        self._up = bool(left)
        if left:
            raise RuntimeError(f"could not delete namespaces {left}; run: ip netns del <name>")


@dataclass
class LinkRun:
    profile: Profile
    shaping: str
    result: RunResult
    wire: dict[str, int] = field(default_factory=dict)  # qdisc bytes during the run
    hosts: dict[str, int] = field(default_factory=dict)  # run's host name -> fabric index

    def busiest(self) -> tuple[str, int]:
        return max(self.wire.items(), key=lambda kv: kv[1]) if self.wire else ("-", 0)

    def as_dict(self) -> dict[str, Any]:
        p, (link, nbytes) = self.profile, self.busiest()
        burst = p.burst_bytes() if p.rate_mbit else 0
        return {"profile": p.key, "shaping": self.shaping, "rate_bytes_per_s": p.rate_bytes_per_s,
                "burst_bytes": burst, "hosts": self.hosts, "wire_bytes": self.wire,
                "busiest_link": link, "busiest_link_bytes": nbytes, **self.result.as_dict(),
                "steps_events": self.result.steps_events}  # fmt: skip


def placement(fabric: Fabric, n: int, gloo: bool) -> tuple[dict[str, Any], dict]:
    """Keyword arguments for run_socket / run_gloo that put the run on the fabric, and the map
    from the run's host names to fabric indexes.

    Socket modes: the server in h0 at 10.10.0.1, worker r in h<r>, every host dialling the
    server's address. gloo: rank r in h<r>, so rank 0 shares the server's namespace and its
    address is MASTER_ADDR; GLOO_SOCKET_IFNAME is the veth.
    """
    if gloo:
        hosts = {f"rank{r}": r for r in range(n)}
        kw = {"master_addr": fabric.addr(0), "ifname": IFNAME}
    else:
        hosts = {name: i for i, name in enumerate([SERVER, *worker_names(n)])}
        server = fabric.addr(0)
        kw = {"extra": {"host_ip": dict.fromkeys(hosts, server), "bind_address": server}}
    kw["launch"] = lambda host: ["ip", "netns", "exec", fabric.ns(hosts[host])]
    return kw, hosts


def run_profiles(
    profiles: list[Profile],
    workers: list[int],
    steps: int,
    modes: dict[str, Callable[..., RunResult]],
    work: Path,
    gloo_mode: str,
    log: Callable[[str], None] = print,
) -> list[LinkRun]:
    """Every mode at every N under every profile, on one fabric built for the largest N."""
    runs: list[LinkRun] = []
    with Fabric(max(workers) + 1) as fabric:
        log(f"  namespaces: {' '.join(fabric.names())}")
        for profile in profiles:
            shaping = fabric.apply(profile)
            log(f"  profile {profile.label}: {shaping}")
            for n in workers:
                for mode, fn in modes.items():
                    log(f"  running {mode} N={n} ({steps} steps) over {profile.label}")
                    kw, hosts = placement(fabric, n, mode == gloo_mode)
                    before = fabric.qdisc_bytes()
                    out = work / "links" / profile.key / f"{slug(mode)}-{n}"
                    result = fn(n, steps, out, **kw)
                    after = fabric.qdisc_bytes()
                    wire = {k: after[k] - before[k] for k in after if after[k] > before[k]}
                    runs.append(LinkRun(profile, shaping, result, wire, hosts))
    return runs  # Fabric.down raised if a namespace was left


def busiest_payload(run: LinkRun) -> tuple[str, float]:
    """The busiest link direction's payload bytes per step, from the trainers' own counters
    (steady state, set-up excluded): the server's link carries every worker's bytes (N x a
    worker's, both ways); in gloo's ring each rank's link carries what that rank sends."""
    r = run.result
    per_worker = max(r.sent_per_step, r.recv_per_step)
    if run.hosts and all(h.startswith("rank") for h in run.hosts):
        return "every rank's link", per_worker
    return "server link", r.workers * per_worker


def link_wire_table(runs: list[LinkRun]) -> str:
    rows = []
    for run in runs:
        r = run.result
        where, payload = busiest_payload(run)
        # the least time per step the rate allows (headers and the tbf burst ignored)
        rate = run.profile.rate_bytes_per_s
        floor = 1e3 * payload / rate if math.isfinite(rate) else None
        end, wire = run.busiest()
        rows.append(
            [r.mode, str(r.workers), where, fmt(payload, ",.0f"), fmt(floor, ".1f"),
             fmt(r.step_ms_median), fmt(r.step_ms_median / floor if floor else None, ".2f"),
             f"{wire / 1e6:,.1f} ({end})" if wire else "- (no shaper)"]
        )  # fmt: skip
    return table(
        "mode|N|busiest link|payload B/step on it|rate floor ms/step|step ms p50|p50 ÷ floor|"
        "MB through busiest shaper, whole run",
        rows,
    )


NOTE = (
    "\npayload B/step: the busiest link direction's bytes per step from the trainers' byte"
    " counters (socket: N x a worker's, on the server's link; gloo ring: one rank's);"
    " elastic: per local step, amortised over pushes. rate floor = that ÷ the profile's"
    " rate (the least step time the link allows). MB through busiest shaper: bytes the"
    " busiest cable end's qdisc sent during the whole run (headers, set-up and initial"
    " weights included; 'up' = host -> switch, 'down' = switch -> host; h0 = the server,"
    " gloo: rank 0)."
)


def report(runs: list[LinkRun], profiles: list[Profile]) -> dict[str, Any]:
    """Print one table per link profile; returns the --json sections."""
    left = our_namespaces()
    print(f"\nnamespaces with prefix {PREFIX} left: {left or 'none'}")
    for profile in profiles:
        mine = [r for r in runs if r.profile == profile]
        if mine:
            print(f"\n## Links: {profile.label} (x gloo = samples/s ratio, same profile, same run)")
            print(f"\nshaping: {mine[0].shaping}\n\n{end_to_end_table([r.result for r in mine])}")
            print(f"\n{link_wire_table(mine)}")
    print(NOTE)
    return {"links": [r.as_dict() for r in runs], "namespaces_left": left}
