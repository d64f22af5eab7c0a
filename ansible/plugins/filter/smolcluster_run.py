"""train.yml's verdict: which hosts' jobs failed, and a report readable without opening a file."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

LOG_LINES = 6
SIGNALS = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM"}
STATES = {
    "exited": "its job exited",
    "dead": "its job died (killed: no exit code)",
    "absent": "its job never started",
}


def run_verdict(
    hosts: Iterable[str], hostvars: Mapping[str, Any], servers: Iterable[str], mode: str
) -> dict[str, list[str]]:
    """Who died, who fails the run, and which elastic workers left early (train.yml's last play).

    A host in the run died unless its job exited 0 (a host that failed mid-play never recorded
    an outcome). Elastic mode is built for workers leaving at any time: the run's result is the
    server's (it finishes the sample budget with whoever is left, or fails when nobody is);
    a sync run fails on any host.
    """
    died = []
    for host in hosts:
        facts = hostvars.get(host) or {}
        outcome = facts.get("trainer__outcome")
        if outcome is None:
            if facts.get("trainer__in_run"):
                died.append(host)
        elif outcome.get("state") != "exited" or outcome.get("exit") != 0:
            died.append(host)
    servers = set(servers)
    if mode == "elastic":
        failed = [host for host in died if host in servers]
        left_early = [host for host in died if host not in servers]
    else:
        failed, left_early = died, []
    return {"died": died, "failed": failed, "left_early": left_early}


def failure_report(
    failed: Iterable[str], hostvars: Mapping[str, Any], runs_dir: str, run_id: str
) -> str:
    """`training failed on: h1, h2 ...` then, per host, how its job ended and its log's end."""
    failed = list(failed)
    lines = [f"training failed on: {', '.join(failed)} (logs in runs/{run_id}/<host>/)"]
    for host in failed:
        outcome = (hostvars.get(host) or {}).get("trainer__outcome") or {}
        state = STATES.get(str(outcome.get("state")), "its job did not report")
        lines.append(f"{host}: {state}{_exit_words(outcome.get('exit'))}")
        log = Path(runs_dir) / host / f"{host}.log"
        try:
            tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines.append(f"{host}: no log fetched ({log} is missing)")
            continue
        if not tail:
            lines.append(f"{host}.log is empty: the job died before it logged anything")
        lines.extend(f"{host}.log | {ln}" for ln in tail[-LOG_LINES:])
    return "\n".join(lines)


def _exit_words(code: Any) -> str:
    try:
        code = int(code)
    except (TypeError, ValueError):
        return ""
    if code > 128:  # the shell's 128 + signal number
        name = SIGNALS.get(code - 128, f"signal {code - 128}")
        return f" with exit code {code} (killed by {name})"
    return f" with exit code {code}"


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "smolcluster_failure_report": failure_report,
            "smolcluster_run_verdict": run_verdict,
        }
