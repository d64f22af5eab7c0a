"""Variables an argument spec types as `str` that hold a list or a mapping.

Ansible's `type: str` check converts such a value to its repr instead of refusing it, so
`smolcluster_root: [a, b]` would pass validation and become a directory named "['a', 'b']".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def string_options(specs: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """Every option of the roles' specs ({role: options}) that wants a string (str is the
    default type)."""
    return sorted(
        {
            n
            for options in specs.values()
            for n, o in options.items()
            if o.get("type", "str") == "str"
        }
    )


def not_string_errors(values: Mapping[str, Any]) -> list[str]:
    """One line per {name: value} whose value is a list or a mapping."""
    errors = []
    for name, value in sorted(values.items()):
        if isinstance(value, Mapping):
            errors.append(f"{name} is a mapping ({dict(value)!r})")
        elif isinstance(value, (list, tuple)):
            errors.append(f"{name} is a list ({list(value)!r})")
    return errors


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "preflight_string_options": string_options,
            "preflight_not_string_errors": not_string_errors,
        }
