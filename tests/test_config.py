"""Bad config input fails before anything starts: exit status 2, one line naming file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from smolcluster.config import PACKAGED_CONFIGS, ConfigError, load_settings

CLUSTER = yaml.safe_load((PACKAGED_CONFIGS / "cluster_config.yaml").read_text())
NN = yaml.safe_load((PACKAGED_CONFIGS / "nn_config.yaml").read_text())


def write(tmp_path: Path, cluster: dict[str, Any], nn: dict[str, Any]) -> tuple[Path, Path]:
    cluster_file, nn_file = tmp_path / "cluster.yaml", tmp_path / "nn.yaml"
    cluster_file.write_text(yaml.safe_dump(cluster))
    nn_file.write_text(yaml.safe_dump(nn))
    return cluster_file, nn_file


def without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


CLUSTER_CASES = {
    "wrong type": ({**CLUSTER, "port": "65432"}, "port", "valid integer"),
    "port out of range": ({**CLUSTER, "port": 70000}, "port", "65535"),
    "port zero": ({**CLUSTER, "port": 0}, "port", "greater than or equal to 1"),
    "missing key": (without(CLUSTER, "server"), "server", "missing"),
    "unknown worker": (
        {**CLUSTER, "workers": ["mini2", "mini3", "nosuch"]},
        "workers.2",
        "no entry in host_ip",
    ),
    "count mismatch": ({**CLUSTER, "num_workers": 5}, "num_workers", "lists 3 hosts"),
    "typo'd key": (
        {**CLUSTER, "worker_update_intervall": 5},
        "worker_update_intervall",
        "unknown key",
    ),
    "bad address": (
        {**CLUSTER, "host_ip": {**CLUSTER["host_ip"], "pi5": "10.10.0"}},
        "host_ip.pi5",
        "not an IP address",
    ),
    "server as worker": (
        {**CLUSTER, "workers": ["mini1", "mini2", "mini3"]},
        "workers",
        "includes the server",
    ),
    "bad mode": ({**CLUSTER, "mode": "async"}, "mode", "sync"),
    "bool as string": ({**CLUSTER, "use_quantization": "yes"}, "use_quantization", "valid boolean"),
}

NN_CASES = {
    "negative lr": ({**NN, "learning_rate": -1.0}, "learning_rate", "greater than 0"),
    "missing batch size": (without(NN, "batch_size"), "batch_size", "missing"),
    "nested typo": ({**NN, "model": {**NN["model"], "hiden": 64}}, "model.hiden", "unknown key"),
    "unknown model": ({**NN, "model": {**NN["model"], "type": "ResNet"}}, "model.type", "SimpleNN"),
    "float epochs": ({**NN, "num_epochs": 1.5}, "num_epochs", "valid integer"),
    "unknown schedule": ({**NN, "lr_schedule": "step"}, "lr_schedule", "cosine"),
}


@pytest.mark.parametrize("case", CLUSTER_CASES)
def test_bad_cluster_config_names_the_key(tmp_path: Path, case: str) -> None:
    data, key, words = CLUSTER_CASES[case]
    cluster_file, nn_file = write(tmp_path, data, NN)
    with pytest.raises(ConfigError) as error:
        load_settings(cluster_file, nn_file)
    assert error.value.key == key
    assert error.value.file == str(cluster_file)
    assert words in error.value.message


@pytest.mark.parametrize("case", NN_CASES)
def test_bad_nn_config_names_the_key(tmp_path: Path, case: str) -> None:
    data, key, words = NN_CASES[case]
    cluster_file, nn_file = write(tmp_path, CLUSTER, data)
    with pytest.raises(ConfigError) as error:
        load_settings(cluster_file, nn_file)
    assert (error.value.key, error.value.file) == (key, str(nn_file))
    assert words in error.value.message


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    cluster_file, nn_file = write(tmp_path, CLUSTER, NN)
    cluster_file.write_text("port: 65432\nworkers: [mini2,\n")
    with pytest.raises(ConfigError, match="line 3: not valid YAML"):
        load_settings(cluster_file, nn_file)


def test_cli_flags_override_and_are_validated(tmp_path: Path) -> None:
    cluster_file, nn_file = write(tmp_path, CLUSTER, NN)
    settings = load_settings(cluster_file, nn_file, {"epochs": 7, "lr": 0.01, "mode": "elastic"})
    assert (settings.nn.num_epochs, settings.nn.learning_rate) == (7, 0.01)
    assert settings.cluster.mode == "elastic"
    with pytest.raises(ConfigError, match="batch_size"):
        load_settings(cluster_file, nn_file, {"batch_size": 0})


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    cluster_file, nn_file = write(tmp_path, {**CLUSTER, "secret_file": "keys/secret"}, NN)
    settings = load_settings(cluster_file, nn_file)
    assert settings.secret_path == tmp_path / "keys" / "secret"
    assert settings.data_root == tmp_path / "data"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smolcluster", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    cluster_file, nn_file = write(tmp_path, {**CLUSTER, "num_workers": 2}, NN)
    for command in ("check-config", "server", "worker"):
        result = run_cli(
            command,
            "--cluster-config",
            str(cluster_file),
            "--nn-config",
            str(nn_file),
            *(["--host", "mini2"] if command == "worker" else []),
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0
        assert result.stderr.startswith(f"smolcluster: error: {cluster_file}: num_workers:")


def test_cli_rejects_a_worker_not_in_the_config(tmp_path: Path) -> None:
    cluster_file, nn_file = write(tmp_path, CLUSTER, NN)
    result = run_cli(
        "worker",
        "--cluster-config",
        str(cluster_file),
        "--nn-config",
        str(nn_file),
        "--host",
        "macbook",
    )
    assert result.returncode == 2
    assert "workers: 'macbook' is not one of" in result.stderr


def test_check_config_accepts_the_packaged_defaults() -> None:
    result = run_cli("check-config")
    assert result.returncode == 0, result.stderr
    assert "server mini1" in result.stdout


def test_check_config_does_not_load_torch(tmp_path: Path) -> None:
    """The trainer role runs it on every host after rendering: it must stay a quick check."""
    cluster_file, nn_file = write(tmp_path, {**CLUSTER, "torch_threads": 1}, NN)
    probe = (
        "import sys; from smolcluster.cli import main; "
        f"rc = main(['check-config', '--cluster-config', {str(cluster_file)!r}, "
        f"'--nn-config', {str(nn_file)!r}]); print(rc, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == "0 False", done.stdout + done.stderr
