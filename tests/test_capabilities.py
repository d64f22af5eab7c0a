"""What each host says its trainer can do (smolcluster/capabilities.py), and what the trainer
role makes of every host's answer (roles/trainer/filter_plugins/trainer_shared.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from smolcluster.capabilities import torch_has_fused_adam
from smolcluster.cipher import AUTO, server_cipher
from tests.ansible_helpers import load_plugin

REPO = Path(__file__).resolve().parents[1]
shared = load_plugin(REPO / "roles" / "trainer" / "filter_plugins" / "trainer_shared.py")
AES, CHACHA = "aes-256-gcm", "chacha20-poly1305"


@pytest.mark.parametrize(
    ("version", "has"),
    [("2.2.2", False), ("2.3.1", False), ("2.4.0", True), ("2.14.1+cu130", True),
     ("2.5.0a0+git1234", True), ("3.0", True), ("1.13.1", False), ("", False), ("dev", False)],
)  # fmt: skip
def test_fused_adam_came_with_torch_2_4(version: str, has: bool) -> None:
    assert torch_has_fused_adam(version) is has


def test_the_answer_is_this_hosts_torch_and_cpu() -> None:
    """The version rule against the real thing: this torch builds a fused CPU Adam or not."""
    done = subprocess.run(
        [sys.executable, "-m", "smolcluster.capabilities"], capture_output=True, text=True,
        check=True, cwd=REPO,
    )  # fmt: skip
    answer = json.loads(done.stdout)
    # In a process of its own: this one may have loaded ansible, whose patches trip torch.
    build = "import torch; torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True)"
    fused = subprocess.run([sys.executable, "-c", build], capture_output=True).returncode == 0
    assert answer == {"cipher": server_cipher(AUTO), "fused_adam": fused}


def said(cipher: str, fused: bool) -> str:
    return json.dumps({"cipher": cipher, "fused_adam": fused})


def test_auto_takes_what_every_host_can_do() -> None:
    macs = [said(AES, True), said(AES, True)]
    assert shared.shared_settings(macs, "auto", "auto") == {"cipher": AES, "fused_adam": True}
    pi4 = [*macs, said(CHACHA, True)]
    assert shared.shared_settings(pi4, "auto", "auto") == {"cipher": CHACHA, "fused_adam": True}
    intel = [*macs, said(AES, False)]
    assert shared.shared_settings(intel, "auto", "auto") == {"cipher": AES, "fused_adam": False}


@pytest.mark.parametrize("silent", ["", "Traceback (most recent call last):", "[]", "null"])
def test_a_host_without_an_answer_counts_as_able_to_do_neither(silent: str) -> None:
    answers = [said(AES, True), silent]
    assert shared.shared_settings(answers, "auto", "auto") == {
        "cipher": CHACHA,
        "fused_adam": False,
    }


def test_an_explicit_setting_wins_over_the_answers() -> None:
    answers = [said(CHACHA, False)]
    got = shared.shared_settings(answers, AES, True)
    assert got == {"cipher": AES, "fused_adam": True}
    # -e trainer_fused_adam=false arrives as a string
    assert shared.shared_settings([], CHACHA, "false")["fused_adam"] is False
    assert shared.shared_settings([], CHACHA, "True")["fused_adam"] is True


def test_a_bad_fused_adam_value_is_one_error_naming_the_key() -> None:
    with pytest.raises(ValueError) as info:
        shared.shared_settings([], "auto", "maybe")
    assert str(info.value) == "trainer_fused_adam: 'maybe' is not auto, true or false"
