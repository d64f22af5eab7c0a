"""The shared run harness (smolcluster/harness.py): what it leaves behind when a wait ends."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from smolcluster.harness import Processes, RunFailed

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_an_interrupted_wait_kills_the_run(tmp_path: Path) -> None:
    """Ctrl-C (or an error in the poll callback) while waiting: the children, each in a
    session of its own where no terminal signal reaches them, are killed, not orphaned."""
    run = Processes(tmp_path)
    child = run.start_process("sleeper", SLEEPER)

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.wait(30, poll=interrupt)
    assert child.poll() is not None, "the child outlived the interrupted wait"


def test_a_timed_out_wait_kills_the_run(tmp_path: Path) -> None:
    run = Processes(tmp_path)
    child = run.start_process("sleeper", SLEEPER)
    with pytest.raises(RunFailed, match=r"\['sleeper'\] still running after 0 s"):
        run.wait(0.3)
    assert child.poll() is not None
