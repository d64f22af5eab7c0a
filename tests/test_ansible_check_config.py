"""The trainer role validates the configs it renders with `smolcluster check-config`.

Real ansible-playbook runs of the role's config phase on a throwaway two-host inventory
(local connections, its own directories and a free port), never the embedded default.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smolcluster.config import load_settings
from smolcluster.harness import free_port
from tests.ansible_helpers import playbook, recap, scratch_checkout, show

CHECK_TASK = "Run smolcluster check-config on the rendered configs"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = scratch_checkout(tmp_path)
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "cluster_dial_address": "127.0.0.1",
        "smolcluster_root": f"{root}/hosts/{{{{ inventory_hostname }}}}",
        "smolcluster_venv": sys.prefix,  # this checkout's venv has the trainer command
        "smolcluster_port": free_port(),
        "smolcluster_bind_address": "127.0.0.1",
        "trainer_wandb_mode": "disabled",
    }
    inventory = {"all": {"children": {
        "server": {"hosts": {"mini1": host}},
        "workers": {"hosts": {"mini2": host}},
    }}}  # fmt: skip
    (root / "inventory" / "check-config.yml").write_text(yaml.safe_dump(inventory))
    play = [{"name": "Render the trainer configs", "hosts": "all", "gather_facts": False,
             "roles": ["trainer"]}]  # fmt: skip
    (root / "configs.yml").write_text(yaml.safe_dump(play))
    return root


def run(checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return playbook(
        checkout, "configs.yml", "-i", "inventory/check-config.yml", "--tags", "trainer-config",
        *args, timeout=300,
    )  # fmt: skip


def errors(output: str) -> list[str]:
    return re.findall(r"^ERROR: (.*)$", output, re.M)


def test_a_refused_combination_stops_the_config_phase_naming_the_key(checkout: Path) -> None:
    result = run(checkout, "-e", "mode=elastic", "-e", "balance=auto")
    assert result.returncode != 0, show(result)
    lines = errors(result.stdout)
    assert len(lines) == 2, show(result)  # one per host: each names its own file
    for host, line in zip(("mini1", "mini2"), sorted(lines), strict=True):
        assert line == (
            f"smolcluster: error: {checkout}/hosts/{host}/config/cluster_config.yaml: balance: "
            "auto needs mode sync and backend socket, not mode elastic, backend socket"
        ), show(result)
    assert all(counts["failed"] == 1 for counts in recap(result.stdout).values()), show(result)


def test_a_good_config_passes_in_check_mode_too_and_changes_nothing(checkout: Path) -> None:
    knobs = ["-e", "step_timeout_s=7", "-e", "connect_retries=3", "-e", "lr=0.5"]
    # Check mode on fresh hosts: nothing is rendered yet, so there is nothing to check.
    fresh = run(checkout, "--check", *knobs)
    assert fresh.returncode == 0, show(fresh)
    assert f"TASK [trainer : {CHECK_TASK}]" not in fresh.stdout, show(fresh)  # skipped
    first = run(checkout, *knobs)
    assert first.returncode == 0, show(first)
    assert f"TASK [trainer : {CHECK_TASK}]" in first.stdout, show(first)
    # What the role rendered is what the models accept, with the -e strings as typed values.
    config = Path(checkout, "hosts", "mini2", "config")
    settings = load_settings(config / "cluster_config.yaml", config / "nn_config.yaml")
    assert settings.cluster.step_timeout_s == 7.0
    assert settings.cluster.connect_retries == 3
    assert settings.nn.learning_rate == 0.5
    assert settings.cluster.workers == ["mini2"]
    # Check mode checks the files on the hosts once they are what would be rendered.
    checked = run(checkout, "--check", *knobs)
    assert checked.returncode == 0, show(checked)
    task = checked.stdout.split(f"TASK [trainer : {CHECK_TASK}]", 1)[1].split("TASK [", 1)[0]
    assert "ok: [mini1]" in task and "ok: [mini2]" in task, show(checked)
    assert all(counts["changed"] == 0 for counts in recap(checked.stdout).values()), show(checked)


def test_a_run_wide_setting_on_one_host_only_is_refused_before_rendering(checkout: Path) -> None:
    """The worker dials its own `port` and trains in its own `mode`: a value set on one host only
    (host_vars, an inventory line) fails naming the key and each host's value; a per-host
    W&B mode is fine."""
    path = checkout / "inventory" / "check-config.yml"
    inventory = yaml.safe_load(path.read_text())
    hosts = inventory["all"]["children"]["workers"]["hosts"]
    port = hosts["mini2"]["smolcluster_port"]
    hosts["mini2"] = {**hosts["mini2"], "smolcluster_port": port + 1, "trainer_mode": "elastic",
                      "trainer_wandb_mode": "offline"}  # fmt: skip
    path.write_text(yaml.safe_dump(inventory))
    result = run(checkout)
    assert result.returncode != 0, show(result)
    assert (
        'mode differs between the run\'s hosts (mini1 "sync", mini2 "elastic"): it must be one '
        "value for the whole run; set it for all of them (group_vars/all.yml or -e), not per host"
        in result.stdout
    ), show(result)
    assert f"port differs between the run's hosts (mini1 {port}, mini2 {port + 1})" in result.stdout
    assert "wandb_mode differs" not in result.stdout, show(result)
    assert not (checkout / "hosts" / "mini1" / "config").exists()  # nothing rendered


def test_auto_takes_the_cipher_and_adam_kernel_every_host_has(
    checkout: Path, tmp_path: Path
) -> None:
    """Each host answers with the trainer's own reading (`python -m smolcluster.capabilities`);
    mini2 here answers as an Intel Mac with a Pi 4's CPU would (no AES, torch 2.2), through a
    venv whose python prints that answer."""
    rendered = Path(checkout, "hosts", "mini1", "config", "cluster_config.yaml")
    on_this_host = json.loads(subprocess.run(
        [sys.executable, "-m", "smolcluster.capabilities"], capture_output=True, text=True,
        check=True,
    ).stdout)  # fmt: skip
    both = run(checkout)
    assert both.returncode == 0, show(both)
    settings = load_settings(rendered, rendered.with_name("nn_config.yaml"))
    assert settings.cluster.cipher == on_this_host["cipher"]
    assert settings.nn.fused_adam is on_this_host["fused_adam"] is True  # torch 2.14 here
    old = tmp_path / "old-venv"
    (old / "bin").mkdir(parents=True)
    answer = json.dumps({"cipher": "chacha20-poly1305", "fused_adam": False})
    (old / "bin" / "python").write_text(f"#!/bin/sh\necho '{answer}'\n")
    (old / "bin" / "python").chmod(0o755)
    (old / "bin" / "smolcluster").symlink_to(Path(sys.prefix, "bin", "smolcluster"))
    inventory = checkout / "inventory" / "check-config.yml"
    hosts = yaml.safe_load(inventory.read_text())["all"]["children"]
    mini2 = hosts["workers"]["hosts"]["mini2"]
    hosts["workers"]["hosts"]["mini2"] = {**mini2, "smolcluster_venv": str(old)}  # mini1's stays
    inventory.write_text(yaml.safe_dump({"all": {"children": hosts}}))
    mixed = run(checkout)
    assert mixed.returncode == 0, show(mixed)
    for host in ("mini1", "mini2"):
        config = Path(checkout, "hosts", host, "config")
        settings = load_settings(config / "cluster_config.yaml", config / "nn_config.yaml")
        assert settings.cluster.cipher == "chacha20-poly1305", host
        assert settings.nn.fused_adam is False, host
    explicit = run(checkout, "-e", "trainer_cipher=aes-256-gcm", "-e", "trainer_fused_adam=true")
    assert explicit.returncode == 0, show(explicit)
    assert "cipher: aes-256-gcm" in rendered.read_text()
    assert "fused_adam: true" in rendered.with_name("nn_config.yaml").read_text()
    bad = run(checkout, "-e", "trainer_fused_adam=maybe")
    assert bad.returncode != 0, show(bad)
    assert "trainer_fused_adam: 'maybe' is not auto, true or false" in bad.stdout, show(bad)
