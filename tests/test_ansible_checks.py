"""Bad `-e` values and inventory mistakes: one line each, once, before anything starts.

Real ansible-playbook runs on a scratch copy of the playbooks; each fails in a few seconds,
before the preflight play (or, for inventory values, in it), so no job ever starts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.ansible_helpers import REPO, load_plugin, playbook, scratch_checkout, show

BAD_OVERRIDES = {
    "epochs": ("abc", "must be an integer ≥ 1"),
    "batch_size": ("0", "must be an integer ≥ 1"),
    "lr": ("fast", "must be a number > 0"),
    "lr_schedule": ("linear", "must be one of constant, cosine"),
    "max_steps": ("-5", "must be an integer ≥ 0"),
    "eval_steps": ("0", "must be an integer ≥ 1"),
    "mode": ("async", "must be one of sync, elastic"),
    "workers": ("mini2,nope", "nope not in group workers"),
    "use_quantization": ("maybe", "must be true or false"),
    "backend": ("mpi", "must be one of socket, gloo, tmux, launchd, systemd"),
    "balance": ("sometimes", "must be one of off, auto"),
    "step_timeout_s": ("0", "must be a number > 0"),
    "join_timeout_s": ("soon", "must be a number > 0"),
    "handshake_timeout_s": ("-1", "must be a number > 0"),
    "heartbeat_interval_s": ("x", "must be a number > 0"),
    "connect_backoff_s": ("0", "must be a number > 0"),
    "connect_retries": ("many", "must be an integer ≥ 1"),
    "min_workers": ("0", "must be an integer ≥ 1"),
    "checkpoint_every": ("1.5", "must be an integer ≥ 1"),
}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scratch_checkout(tmp_path_factory.mktemp("checks"))


def errors(output: str) -> list[str]:
    return re.findall(r"^ERROR: (.*)$", output, re.M)


def test_every_bad_override_gets_one_line_once(checkout: Path) -> None:
    args = [arg for name, (value, _) in BAD_OVERRIDES.items() for arg in ("-e", f"{name}={value}")]
    result = playbook(checkout, "train.yml", *args, timeout=120)
    assert result.returncode != 0, show(result)
    lines = errors(result.stdout)
    for name, (value, allowed) in BAD_OVERRIDES.items():
        mine = [line for line in lines if line.startswith(f"train.yml: {name}={value!r}: ")]
        assert len(mine) == 1 and allowed in mine[0], (name, lines)
    assert len(lines) == len(BAD_OVERRIDES)
    assert "PLAY [Preflight" not in result.stdout  # nothing else ran
    assert "argument_spec" not in result.stdout + result.stderr
    assert len(result.stdout) < 6000, show(result)


def test_one_bad_override_is_one_line(checkout: Path) -> None:
    result = playbook(checkout, "train.yml", "-e", "epochs=abc", timeout=120)
    assert result.returncode != 0
    assert errors(result.stdout) == ["train.yml: epochs='abc': must be an integer ≥ 1"]


def test_bad_role_variable_is_one_line_not_the_spec(checkout: Path) -> None:
    result = playbook(
        checkout, "train.yml", "-e", "trainer_epochs=abc", "-e", "trainer_mode=bogus", timeout=120
    )
    assert result.returncode != 0
    assert sorted(errors(result.stdout)) == [
        "role trainer: trainer_epochs='abc': must be an integer",
        "role trainer: trainer_mode='bogus': must be one of sync, elastic",
    ], show(result)
    assert "argument_spec_data" not in result.stdout
    assert "PLAY [Start the jobs" not in result.stdout


@pytest.mark.parametrize(
    ("host_vars", "expected"),
    [
        (
            {"smolcluster_port": "http"},
            "role preflight: smolcluster_port='http': must be an integer",
        ),
        (
            {"dataset_source": "usb-stick"},
            "role dataset: dataset_source='usb-stick': must be one of full-mnist, torchvision, "
            "offline-digits, directory",
        ),
    ],
)
def test_inventory_mistake_is_one_line_once(
    checkout: Path, tmp_path: Path, host_vars: dict[str, str], expected: str
) -> None:
    inventory = yaml.safe_load((REPO / "inventory" / "local.yml").read_text())
    for host in inventory["all"]["children"]["server"]["hosts"].values():
        host.update(host_vars)  # the anchor: every host shares this mapping
    bad = checkout / "inventory" / f"bad-{tmp_path.name}.yml"
    bad.write_text(yaml.safe_dump(inventory))
    result = playbook(checkout, "train.yml", "-i", str(bad), timeout=120)
    assert result.returncode != 0
    lines = errors(result.stdout)
    assert lines.count(expected) == 1, show(result)
    assert "argument_spec_data" not in result.stdout
    assert "PLAY [Start the jobs" not in result.stdout


def test_good_overrides_pass_the_check() -> None:
    checks = load_plugin(REPO / "ansible" / "plugins" / "filter" / "smolcluster_checks.py")
    good = {
        "epochs": "2", "batch_size": 64, "lr": "0.01", "lr_schedule": "cosine", "max_steps": "0",
        "eval_steps": "10", "mode": "elastic", "workers": "mini2, mini3",
        "use_quantization": "yes", "backend": "gloo", "balance": False, "step_timeout_s": "2.5",
        "join_timeout_s": 30, "handshake_timeout_s": "1", "heartbeat_interval_s": "0.5",
        "connect_backoff_s": "0.1", "connect_retries": "3", "min_workers": "1",
        "checkpoint_every": "50", "unrelated": "x",
    }  # fmt: skip
    assert checks.override_errors(good, "train.yml", ["mini2", "mini3"]) == []
    assert checks.override_errors({"workers": ["mini3"]}, "train.yml", ["mini2", "mini3"]) == []
