"""python_env for real, on this machine: the local default's venv + shared controller packages
(idempotent, smoke test), and the uv path as a fresh non-root user (F3).

The uv test creates a throwaway user with an empty home, gives it a real uv (from the uv wheel on
the package registry) through a stand-in for Astral's installer script (no internet here: the
stand-in copies the same uv binary to the same place, ~/.local/bin), and runs site.yml's
python_env tags as that user: the controller (root here, its Python unreadable to others) reaches
the "host" with `su` to the user, the way an SSH login as that user would, and the user's own
tasks use Debian's /usr/bin/python3. Nothing outside the test's directories is written; the user
is removed afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.ansible_helpers import REPO, playbook, recap, scratch_checkout, show

UV_VERSION = "0.13.9"


def _inventory(path: Path, host_vars: dict) -> Path:
    # Group server only because trainer/main.yml's always-tagged first task reads it.
    path.write_text(yaml.safe_dump({"server": {"hosts": {"mini2": host_vars}}}))
    return path


def test_local_default_venv_works_and_is_smoke_tested(tmp_path: Path) -> None:
    (tmp_path / "checkout").mkdir()
    checkout = scratch_checkout(tmp_path / "checkout")
    inventory = _inventory(
        tmp_path / "inventory.yml",
        {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "smolcluster_root": str(tmp_path / "mini2"),
            "smolcluster_controller_dir": str(tmp_path / "controller"),
            "python_env_tool": "venv",
            "python_env_python": sys.executable,
            "python_env_reuse_controller_packages": True,
        },
    )
    first = playbook(checkout, "site.yml", "-i", str(inventory), "--tags", "python_env")
    assert first.returncode == 0, show(first)
    # The smoke test ran and passed (its failure is tested on the uv venv below; a second
    # run's changed=0 is tests/test_ansible_local.py's, over all six hosts).
    assert "TASK [python_env : Import torch and smolcluster, multiply two small matrices]" in (
        first.stdout
    )


def _uv_binary(cache: Path) -> Path:
    """A real uv, unpacked from the uv wheel (downloaded once into .cache/)."""
    binary = cache / f"uv-{UV_VERSION}" / "uv"
    if binary.exists():
        return binary
    wheels = cache / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "-d", str(wheels), f"uv=={UV_VERSION}"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    found = sorted(wheels.glob(f"uv-{UV_VERSION}-*.whl"))
    if proc.returncode != 0 or not found:
        pytest.skip(f"no uv {UV_VERSION} wheel from the package index: {proc.stderr[-300:]}")
    with zipfile.ZipFile(found[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith("/scripts/uv"))
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_bytes(wheel.read(member))
    binary.chmod(0o755)
    return binary


@pytest.fixture
def fresh_user() -> Iterator[tuple[str, Path]]:
    """A throwaway login user with an empty home under a world-readable scratch directory."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root (to create a throwaway user) and /usr/bin/python3")
    base = Path(tempfile.mkdtemp(prefix="scl-pyenv-"))
    base.chmod(0o755)
    name = f"scl{uuid.uuid4().hex[:8]}"
    home = base / "home"
    subprocess.run(["useradd", "-m", "-d", str(home), "-s", "/bin/sh", name], check=True)
    try:
        yield name, base
    finally:
        subprocess.run(["userdel", "-r", name], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_uv_path_on_a_fresh_home_as_a_normal_user(fresh_user: tuple[str, Path]) -> None:
    name, base = fresh_user
    uv = _uv_binary(REPO / ".cache" / "uv")
    shutil.copy2(uv, base / "uv")
    installer = base / "uv-installer.sh"
    installer.write_text(
        "#!/bin/sh\n# Stand-in for Astral's installer: the same uv, the same place.\n"
        f'set -eu\nmkdir -p "$HOME/.local/bin"\ncp {base}/uv "$HOME/.local/bin/uv"\n'
    )
    installer.chmod(0o755)
    mirror = base / "wheelhouse"  # an empty local mirror: nothing may come from an index
    mirror.mkdir()
    (base / "checkout").mkdir()
    checkout = scratch_checkout(base / "checkout")
    home = Path(pwd.getpwnam(name).pw_dir)
    inventory = _inventory(
        base / "inventory.yml",
        {
            "ansible_connection": "local",
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_become": True,
            "ansible_become_method": "su",
            "ansible_become_user": name,
            # site.yml's preflight play (skipped by --tags) would gather the facts it defaults from.
            "smolcluster_root": str(home / "smolcluster"),
            "python_env_tool": "uv",
            "python_env_python": "/usr/bin/python3",
            "python_env_uv_installer_url": f"file://{installer}",
            "python_env_find_links": str(mirror),
            "python_env_no_index": True,
            "python_env_uv_env": {"UV_PYTHON_DOWNLOADS": "never", "UV_LINK_MODE": "symlink",
                                  "UV_CACHE_DIR": str(home / "uv-cache")},
        },
    )  # fmt: skip

    def as_user(*args: str) -> subprocess.CompletedProcess[str]:
        return playbook(checkout, *args, timeout=600)

    # F3 on a fresh home: the installer lands in ~/smolcluster, uv in ~/.local/bin, then the
    # venv. The venv has no torch yet, so the smoke test fails in one sentence naming the host.
    first = as_user("site.yml", "-i", str(inventory), "--tags",
                    "python-env-tools,python-env-venv,python-env-smoke")  # fmt: skip
    assert (home / ".local" / "bin" / "uv").exists(), show(first)
    venv_python = home / "smolcluster" / "venv" / "bin" / "python"
    assert venv_python.exists(), show(first)
    assert (home / "smolcluster").stat().st_uid == pwd.getpwnam(name).pw_uid
    assert first.returncode != 0
    assert (
        "mini2: importing torch/smolcluster failed with torch (not installed): "
        "ModuleNotFoundError: No module named 'torch'" in first.stdout
    ), show(first)
    # Second run, now up to the install: nothing changes on the way (uv present, venv there),
    # and the real uv takes the mirror argv without asking any index: the empty mirror has no
    # torch, so the torch step fails with uv's own words about the given locations.
    again = as_user("site.yml", "-i", str(inventory), "--tags",
                    "python-env-tools,python-env-venv,python-env-install")  # fmt: skip
    assert again.returncode != 0
    assert "TASK [python_env : Install torch]" in again.stdout, show(again)
    assert "not found in the provided package locations" in again.stdout, show(again)
    assert recap(again.stdout)["mini2"]["changed"] == 0, show(again)
