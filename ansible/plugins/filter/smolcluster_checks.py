"""One-line answers to bad train.yml overrides, before anything starts.

`-e` values arrive as strings; each rule says what is allowed in the words of the message
(`train.yml: epochs='abc': must be an integer ≥ 1`). The ranges are the trainer's own
(smolcluster/config.py), so a value that passes here is not refused later on a host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

UNSET = "__smolcluster_unset__"
TRUE = {"true", "yes", "on", "1"}
FALSE = {"false", "no", "off", "0"}


def _integer(minimum: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool):
            return f"must be an integer ≥ {minimum}"
        try:
            number = int(str(value).strip())
        except ValueError:
            return f"must be an integer ≥ {minimum}"
        return None if number >= minimum else f"must be an integer ≥ {minimum}"

    return check


def _positive(value: Any) -> str | None:
    if isinstance(value, bool):
        return "must be a number > 0"
    try:
        number = float(str(value).strip())
    except ValueError:
        return "must be a number > 0"
    return None if number > 0 and number != float("inf") else "must be a number > 0"


def _choice(*allowed: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) and "off" in allowed:
            value = "auto" if value else "off"  # YAML reads a bare off as false
        return None if str(value) in allowed else f"must be one of {', '.join(allowed)}"

    return check


def _boolean(value: Any) -> str | None:
    if isinstance(value, bool) or str(value).strip().lower() in TRUE | FALSE:
        return None
    return "must be true or false"


RULES: dict[str, Callable[[Any], str | None]] = {
    "epochs": _integer(1),
    "batch_size": _integer(1),
    "lr": _positive,
    "lr_schedule": _choice("constant", "cosine"),
    "max_steps": _integer(0),
    "eval_steps": _integer(1),
    "mode": _choice("sync", "elastic"),
    "use_quantization": _boolean,
    "backend": _choice("socket", "gloo", "tmux", "launchd", "systemd"),
    "balance": _choice("off", "auto"),
    "step_timeout_s": _positive,
    "join_timeout_s": _positive,
    "handshake_timeout_s": _positive,
    "heartbeat_interval_s": _positive,
    "connect_backoff_s": _positive,
    "connect_retries": _integer(1),
    "min_workers": _integer(1),
    "checkpoint_every": _integer(1),
}


def _worker_names(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [name.strip() for name in value.split(",")]
    if isinstance(value, list | tuple):
        return [str(name).strip() for name in value]
    return None


def _workers_error(value: Any, known: list[str]) -> str | None:
    allowed = f"comma-separated names from group workers ({', '.join(known)})"
    names = _worker_names(value)
    if names is None or not names or any(not name for name in names):
        return f"must be {allowed}"
    unknown = [name for name in names if name not in known]
    if unknown:
        return f"{', '.join(unknown)} not in group workers; must be {allowed}"
    if len(set(names)) != len(names):
        return f"names a host twice; must be {allowed}"
    return None


def override_errors(
    values: Mapping[str, Any], playbook: str, workers_group: Iterable[str] = ()
) -> list[str]:
    """`<playbook>: <name>=<value>: <what is allowed>` for every bad override given."""
    errors = []
    for name, value in values.items():
        if value == UNSET or value is None:
            continue
        if name == "workers":
            problem = _workers_error(value, list(workers_group))
        elif name in RULES:
            problem = RULES[name](value)
        else:
            continue
        if problem:
            errors.append(f"{playbook}: {name}={str(value)!r}: {problem}")
    return errors


def override_names() -> list[str]:
    return ["workers", *RULES]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"smolcluster_override_errors": override_errors}
