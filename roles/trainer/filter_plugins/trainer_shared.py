"""The settings every host of a run must share, from what each host said it can do.

Each host answers `python -m smolcluster.capabilities` (JSON on stdout). One cipher seals the
whole cluster (the server seals the average once for every worker) and one Adam kernel keeps
the replicas bit-identical, so the run takes what every host can do: AES-256-GCM only when all
have AES instructions (a Pi 4 has none), fused Adam only when every torch has it (an Intel
Mac's torch stops at 2.2). A host that gave no answer (no trainer yet: check mode before
site.yml) counts as able to do neither.

Every other run-wide key is each host's own variable, so a host_vars override on one host (a
port only the server has, `trainer_mode` on one Pi) is refused before anything starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

AES, CHACHA = "aes-256-gcm", "chacha20-poly1305"


def _answer(stdout: Any) -> dict[str, Any]:
    try:
        answer = json.loads(stdout or "")
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def shared_settings(answers: Iterable[Any], cipher: str, fused_adam: Any) -> dict[str, Any]:
    """{'cipher': ..., 'fused_adam': ...}: the configured value, or for `auto` what every
    answer allows."""
    hosts = [_answer(stdout) for stdout in answers]
    every = bool(hosts)
    if cipher == "auto":
        cipher = AES if every and all(h.get("cipher") == AES for h in hosts) else CHACHA
    choice = str(fused_adam).lower()
    if choice == "auto":
        fused = every and all(h.get("fused_adam") is True for h in hosts)
    elif choice in ("true", "false"):
        fused = choice == "true"
    else:
        raise ValueError(f"trainer_fused_adam: {fused_adam!r} is not auto, true or false")
    return {"cipher": cipher, "fused_adam": fused}


def differing_settings(
    hostvars: Mapping[str, Mapping[str, Any]], hosts: Iterable[str], fact: str,
    per_host: Iterable[str],
) -> list[str]:  # fmt: skip
    """One line per key of the config `fact` (set on every host) whose value is not the same
    on all `hosts`, keys in `per_host` aside; hosts without the fact (not in this play) are
    left out."""
    configs = {h: dict(hostvars[h][fact]) for h in hosts if fact in hostvars.get(h, {})}
    keys = sorted({k for config in configs.values() for k in config} - set(per_host))
    errors = []
    for key in keys:
        shown = {h: json.dumps(c.get(key), sort_keys=True, default=str) for h, c in configs.items()}
        if len(set(shown.values())) > 1:
            each = ", ".join(f"{h} {value}" for h, value in shown.items())
            errors.append(
                f"{key} differs between the run's hosts ({each}): it must be one value for the "
                "whole run; set it for all of them (group_vars/all.yml or -e), not per host"
            )
    return errors


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "trainer_shared_settings": shared_settings,
            "trainer_differing_settings": differing_settings,
        }
