"""Pure helpers for the python_env role: install command lines and the smoke test's verdict.

Kept out of Jinja so the argv for every index/mirror combination is unit-tested
(tests/test_python_env_plan.py) and the tasks stay one line each.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from typing import Any


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    """A path, a list of paths, or nothing -> a list without empty entries."""
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value if v]


def install_argv(
    prefix: Sequence[str],
    packages: Sequence[str],
    index_url: str = "",
    find_links: str | Sequence[str] | None = None,
    no_index: bool = False,
) -> list[str]:
    """`<prefix> [--index-url U] [--find-links D]... [--no-index] <packages>`.

    prefix is `uv pip install --python <venv python>` or `<venv python> -m pip install`. Only the
    torch step is given the torch index (it *replaces* the package index, which lacks wandb and
    pydantic); the smolcluster step keeps the normal index. With no_index nothing is fetched from
    any index, so an index URL would be meaningless and is left out.
    """
    argv = [str(a) for a in prefix]
    if index_url and not no_index:
        argv += ["--index-url", str(index_url)]
    for link in _as_list(find_links):
        argv += ["--find-links", link]
    if no_index:
        argv.append("--no-index")
    return argv + [str(p) for p in packages]


def smoke_message(
    result: Mapping[str, Any], host: str, torch_version: str, architecture: str = ""
) -> str:
    """One sentence for a failed `import torch, smolcluster` + matmul: host, torch, likely cause."""
    rc = int(result.get("rc", 1))
    lines = [ln for ln in str(result.get("stderr", "")).strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else "no error output"
    torch = f"torch {torch_version}" if torch_version else "torch (not installed)"
    where = f" ({architecture})" if architecture else ""
    if rc in (-signal.SIGILL, 128 + signal.SIGILL):
        return (
            f"{host}: {torch} died with SIGILL (illegal instruction) on import: this CPU{where} is "
            "too old for this torch build (a Pi 4 is ARMv8.0, without the LSE atomics some aarch64 "
            "releases need); pin python_env_torch_packages to a release that supports it "
            "(roles/python_env/defaults/main.yml lists the known-good pins)."
        )
    if rc < 0 or rc > 128:
        sig = -rc if rc < 0 else rc - 128
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return (
            f"{host}: {torch} crashed with {name} on import or in a tiny matmul: the wheel does "
            f"not fit this machine{where}; reinstall it (teardown.yml -e purge=true, then "
            "site.yml) or pin another python_env_torch_packages."
        )
    if "ImportError" in last or "ModuleNotFoundError" in last or "OSError" in last:
        return (
            f"{host}: importing torch/smolcluster failed with {torch}: {last} (a package is "
            "missing from the venv, or a wheel was built for another platform or Python: check "
            "python_env_find_links / python_env_torch_index_url and re-run site.yml)."
        )
    return f"{host}: the torch smoke test failed (rc {rc}) with {torch}: {last}."


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "python_env_install_argv": install_argv,
            "python_env_smoke_message": smoke_message,
        }
