"""ansible-lint (production profile) and the playbooks' syntax check."""

from __future__ import annotations

import subprocess

import pytest

from tests.ansible_helpers import BIN, REPO, playbook, show


def test_ansible_lint_production_profile() -> None:
    result = subprocess.run(
        [str(BIN / "ansible-lint"), "--profile", "production", "--nocolor"],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]


@pytest.mark.parametrize("name", ["site.yml", "train.yml", "teardown.yml", "doctor.yml"])
def test_playbook_syntax(name: str) -> None:
    result = playbook(REPO, "--syntax-check", name)
    assert result.returncode == 0, show(result)
