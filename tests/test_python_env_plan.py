"""python_env's install command lines (F4) and the smoke test's one-sentence verdict (F7)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible.plugins.loader import filter_loader
from ansible.template import Templar, trust_as_template

from tests.ansible_helpers import load_plugin

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "roles/python_env/filter_plugins/python_env_plan.py"
plan = load_plugin(PLUGIN)

UV = ["/usr/local/bin/uv", "pip", "install", "--python", "/home/smol/smolcluster/venv/bin/python"]
PINS = ["torch==2.11.0", "torchvision==0.26.0"]
WHEEL = "/home/smol/smolcluster/wheels/smolcluster-0.1.0-py3-none-any.whl"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def test_pi_torch_comes_from_the_torch_index_and_smolcluster_from_the_normal_one() -> None:
    torch = plan.install_argv(UV, PINS, CPU_INDEX, [], False)
    assert torch == [*UV, "--index-url", CPU_INDEX, *PINS]
    wheel = plan.install_argv([*UV, "--reinstall-package", "smolcluster"], [*PINS, WHEEL], "")
    assert "--index-url" not in wheel and "--extra-index-url" not in wheel
    assert wheel == [*UV, "--reinstall-package", "smolcluster", *PINS, WHEEL]


def test_lab_mirror_is_find_links_and_no_index_on_both_steps() -> None:
    # The lab: a read-only mirror on the host, no internet; group_vars/pis.yml still sets the
    # torch index, which must not appear (it would be meaningless next to --no-index).
    torch = plan.install_argv(UV, PINS, CPU_INDEX, "/srv/wheelhouse", True)
    assert torch == [*UV, "--find-links", "/srv/wheelhouse", "--no-index", *PINS]
    wheel = plan.install_argv(UV, [*PINS, WHEEL], "", ["/srv/wheelhouse"], True)
    assert wheel == [*UV, "--find-links", "/srv/wheelhouse", "--no-index", *PINS, WHEEL]


def test_mirror_with_index_fallback_and_wheelhouse() -> None:
    argv = plan.install_argv(UV, PINS, "", ["/home/smol/smolcluster/wheelhouse", "", "/srv/w"])
    assert argv == [
        *UV, "--find-links", "/home/smol/smolcluster/wheelhouse", "--find-links", "/srv/w", *PINS,
    ]  # fmt: skip


def _trusted(value):
    """YAML read by hand is not trusted for templating in ansible-core 2.19; these files are."""
    if isinstance(value, str):
        return trust_as_template(value)
    if isinstance(value, list):
        return [_trusted(v) for v in value]
    if isinstance(value, dict):
        return {k: _trusted(v) for k, v in value.items()}
    return value


def _load(rel: str):
    return _trusted(yaml.safe_load((REPO / rel).read_text()))


def render_argv(task_name: str, groups: list[str], host_vars: dict, arch: str) -> list[str]:
    """The argv the role's task really gets: its own Jinja over the role's defaults and vars,
    group_vars and host vars (precedence as Ansible's, simplified), rendered by Ansible."""
    filter_loader.add_directory(str(PLUGIN.parent))
    variables: dict = {}
    for rel in ["roles/python_env/defaults/main.yml", "group_vars/all.yml"]:
        variables.update(_load(rel))
    for group in groups:
        single = REPO / "group_vars" / f"{group}.yml"
        variables.update(
            _load(f"group_vars/{group}.yml" if single.exists() else f"group_vars/{group}/main.yml")
        )
    variables.update(_trusted(host_vars))
    variables.update(_load("roles/python_env/vars/main.yml"))
    variables.update(
        ansible_facts={"system": "Linux", "architecture": arch, "user_dir": "/home/smol"},
        python_env__uv="/usr/local/bin/uv",
        python_env__wheel="/ctl/build/smolcluster/wheels/h/smolcluster-0.1.0-py3-none-any.whl",
        playbook_dir="/ctl",
    )
    tasks = []
    for task in _load("roles/python_env/tasks/install.yml"):
        tasks += task.get("block", [task])
    (task,) = [t for t in tasks if t["name"] == task_name]
    argv = Templar(variables=variables).template(task["ansible.builtin.command"]["argv"])
    return [str(a) for a in argv]


# What the lead's lab sets on every host (docs/lab.md): uv on PATH, Debian's python, the mirror.
LAB = {
    "python_env_tool": "uv",
    "python_env_python": "/usr/bin/python3",
    "python_env_find_links": "/srv/wheelhouse",
    "python_env_no_index": True,
    "python_env_uv_env": {"UV_LINK_MODE": "symlink", "UV_CACHE_DIR": "/srv/uv-cache"},
}
VENV_PY = "/home/smol/smolcluster/venv/bin/python"


@pytest.mark.parametrize(
    ("groups", "host_vars", "arch", "torch_argv", "wheel_argv"),
    [
        pytest.param(
            ["pis"], {}, "aarch64",
            ["--index-url", CPU_INDEX, "torch==2.11.0", "torchvision==0.26.0"],
            ["--reinstall-package", "smolcluster", "torch==2.11.0", "torchvision==0.26.0"],
            id="pi-real-cluster",
        ),
        pytest.param(
            ["pis"], LAB, "x86_64",
            ["--find-links", "/srv/wheelhouse", "--no-index", "torch==2.14.1",
             "torchvision==0.29.1"],
            ["--reinstall-package", "smolcluster", "--find-links", "/srv/wheelhouse",
             "--no-index", "torch==2.14.1", "torchvision==0.29.1"],
            id="lab-pi",
        ),
        pytest.param(
            ["macs"], {"python_env_wheelhouse": "/ctl/wheelhouse"}, "x86_64",
            ["--find-links", "/home/smol/smolcluster/wheelhouse", "--no-index", "torch==2.14.1",
             "torchvision==0.29.1"],
            ["--reinstall-package", "smolcluster", "--find-links",
             "/home/smol/smolcluster/wheelhouse", "--no-index", "torch==2.14.1",
             "torchvision==0.29.1"],
            id="controller-wheelhouse",
        ),
    ],
)  # fmt: skip
def test_task_argv(groups, host_vars, arch, torch_argv, wheel_argv) -> None:
    prefix = ["/usr/local/bin/uv", "pip", "install", "--python", VENV_PY]
    assert render_argv("Install torch", groups, host_vars, arch) == [*prefix, *torch_argv]
    wheel = render_argv("Install the wheel with uv", groups, host_vars, arch)
    # F4: the torch index never reaches the smolcluster step (wandb, pydantic are not on it).
    assert wheel == [
        *prefix, *wheel_argv, "/home/smol/smolcluster/wheels/smolcluster-0.1.0-py3-none-any.whl",
    ]  # fmt: skip


def test_every_uv_call_gets_the_uv_environment() -> None:
    tasks = REPO / "roles/python_env/tasks"
    uv_tasks = []
    for name in ("venv.yml", "install.yml"):
        for task in yaml.safe_load((tasks / name).read_text()):
            for sub in task.get("block", [task]):
                if "uv" in sub["name"] or sub["name"] == "Install torch":
                    uv_tasks.append(sub)
    assert len(uv_tasks) == 3  # uv venv, torch, the wheel
    assert all("python_env_uv_env" in str(t.get("environment")) for t in uv_tasks)


def _rc_of(code: str) -> int:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, check=False).returncode


def test_smoke_message_sigill_names_host_version_and_cause() -> None:
    # The rc a process killed by SIGILL really has (the command module reports it as is).
    rc = _rc_of("import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    assert rc == -signal.SIGILL
    msg = plan.smoke_message({"rc": rc, "stderr": ""}, "pi4", "2.10.0", "aarch64")
    assert msg.startswith("pi4: torch 2.10.0 died with SIGILL")
    assert "too old for this torch build" in msg and "python_env_torch_packages" in msg
    assert "\n" not in msg
    # Through a shell the same death is 128 + 4.
    assert "SIGILL" in plan.smoke_message({"rc": 132}, "pi4", "2.10.0")


def test_smoke_message_import_error_and_other_failures() -> None:
    stderr = (
        "Traceback (most recent call last):\n  ...\nModuleNotFoundError: No module named 'torch'\n"
    )
    msg = plan.smoke_message({"rc": 1, "stderr": stderr}, "pi5", "")
    assert msg.startswith("pi5: importing torch/smolcluster failed with torch (not installed)")
    assert "No module named 'torch'" in msg
    crash = plan.smoke_message({"rc": -signal.SIGSEGV}, "mini2", "2.14.1")
    assert crash.startswith("mini2: torch 2.14.1 crashed with SIGSEGV")
    other = plan.smoke_message({"rc": 1, "stderr": "AssertionError\n"}, "mini3", "2.14.1")
    assert other == "mini3: the torch smoke test failed (rc 1) with torch 2.14.1: AssertionError."


def test_pins_keep_this_machine_and_a_pi4_safe_release() -> None:
    defaults = yaml.safe_load((REPO / "roles/python_env/defaults/main.yml").read_text())
    pins = defaults["python_env_torch_pins"]
    assert pins["Linux-x86_64"] == ["torch==2.14.1", "torchvision==0.29.1"]
    # 2.10.0 dies on a Pi 4 (pytorch/pytorch#176993); 2.11.0 was fixed for ARMv8.0.
    assert pins["Linux-aarch64"] == ["torch==2.11.0", "torchvision==0.26.0"]
    assert "ansible_facts['architecture']" in defaults["python_env_torch_packages"]


def test_local_default_wheel_argv_is_unchanged() -> None:
    """The local default (stdlib venv seeing the controller's packages) installs only the wheel,
    offline and without dependencies, exactly as before the mirror options existed."""
    local = {"python_env_tool": "venv", "python_env_reuse_controller_packages": True}
    argv = render_argv("Install the wheel with pip", [], local, "x86_64")
    assert argv == [
        VENV_PY, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
        "--ignore-installed", "/home/smol/smolcluster/wheels/smolcluster-0.1.0-py3-none-any.whl",
    ]  # fmt: skip
