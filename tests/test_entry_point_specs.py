"""Entry points reached with include_role tasks_from are validated against their argument specs.

ansible-core matches an entry point on tasks_from exactly as written: `tasks_from: smoke.yml`
meets no spec named `smoke` and runs unchecked. The playbooks write tasks_from without ".yml",
as the specs are named; a real ansible-playbook run shows a bad value stops the entry point,
naming the variable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.ansible_helpers import playbook, scratch_checkout, show

pytestmark = pytest.mark.slow

SMOKE = [
    {
        "name": "The python_env smoke test, as preflight's doctor.yml includes it",
        "hosts": "mini1",
        "gather_facts": False,
        "tasks": [
            {
                "name": "Smoke-test the venv",
                "ansible.builtin.include_role": {"name": "python_env", "tasks_from": "smoke"},
                "vars": {"python_env_tool": "conda"},  # allowed: uv, venv
            }
        ],
    }
]


def test_a_wrong_typed_variable_stops_an_included_entry_point(tmp_path: Path) -> None:
    work = scratch_checkout(tmp_path)
    (work / "smoke.yml").write_text(yaml.safe_dump(SMOKE, sort_keys=False))
    result = playbook(work, "smoke.yml", timeout=120)
    assert result.returncode != 0, show(result)
    assert "python_env_tool" in result.stdout, show(result)
    assert "role python_env" in result.stdout, show(result)
