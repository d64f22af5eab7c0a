"""Helpers for the Ansible tests: run real ansible-playbook processes in a scratch checkout."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import yaml

from smolcluster.harness import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a scratch checkout needs: the playbooks, roles and the package the wheel is built from.
CHECKOUT = [
    "ansible.cfg", "site.yml", "train.yml", "teardown.yml", "doctor.yml", "pyproject.toml",
    "inventory", "group_vars", "roles", "ansible", "smolcluster",
]  # fmt: skip
RECAP = re.compile(
    r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)


def load_plugin(path: Path) -> ModuleType:
    """A plugin's module, loaded from its file (plugin directories are not packages)."""
    spec = importlib.util.spec_from_file_location(f"plugin_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scratch_checkout(dest: Path) -> Path:
    """Copy what the playbooks need into dest, so runs never touch the developer's files."""
    for name in CHECKOUT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def playbook(cwd: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    env.pop("ANSIBLE_CONFIG", None)
    return subprocess.run(
        [str(BIN / "ansible-playbook"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def local_inventory(tmp_path: Path, server: list[str], workers: dict[str, dict]) -> Path:
    """A scratch inventory of this machine under the cluster's host names (local connection):
    `server` dials 127.0.0.1, `workers` carry their own vars. smolcluster_root is set per host
    under tmp_path: group_vars/all.yml would beat one set for the group all (~/smolcluster)."""
    local = {
        "ansible_connection": "local",
        "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        "smolcluster_root": str(tmp_path / "{{ inventory_hostname }}"),
    }
    hosts = {name: {**local, "cluster_dial_address": "127.0.0.1"} for name in server}
    inventory = {
        "all": {
            "children": {
                "server": {"hosts": hosts},
                "workers": {"hosts": {n: {**local, **v} for n, v in workers.items()}},
            },
        }
    }
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


def preflight(inventory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """site.yml's preflight checks alone, on a free port: nothing is created or changed."""
    return playbook(
        REPO, "site.yml", "-i", str(inventory), "--tags", "preflight",
        "-e", f"smolcluster_port={free_port()}", "-e", "preflight_install_tools=false", *extra,
    )  # fmt: skip


def remove_tmux_server(socket_name: str) -> None:
    """End a test's own tmux server and remove its socket file, which a server that ended with
    its last session leaves behind in the tmux directory."""
    subprocess.run(["tmux", "-L", socket_name, "kill-server"], capture_output=True, check=False)
    tmux_dir = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
    (tmux_dir / socket_name).unlink(missing_ok=True)


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP as {host: {ok, changed, unreachable, failed}}."""
    return {
        host: {"ok": int(ok), "changed": int(ch), "unreachable": int(un), "failed": int(fa)}
        for host, ok, ch, un, fa in RECAP.findall(output)
    }


def doctor_lines(output: str) -> dict[str, str]:
    """doctor.yml's verdict: host -> its line (ok, or the check, the errno and the fix)."""
    block = output[output.index("One line per host") :]
    return dict(re.findall(r'^\s+"(\w+): (.*)",?$', block, re.M))


def show(result: subprocess.CompletedProcess[str]) -> str:
    tail, err = result.stdout[-6000:], result.stderr[-3000:]
    return f"rc={result.returncode}\n--- stdout (tail)\n{tail}\n--- stderr\n{err}"
