"""The RSS benchmark's measurement: a child's own peak, not that of the process that forked it."""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import rss
from smolcluster.harness import Processes


def test_peak_is_the_childs_own_not_the_forking_parents(tmp_path: Path) -> None:
    held = bytearray(400_000_000)  # this process is far bigger than the child will be
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page: resident, not just reserved
    code = "x = bytearray(60_000_000); x[::4096] = b'1' * len(x[::4096])"
    run = Processes(tmp_path, launch=rss.recording(tmp_path))
    run.start_process("child", [sys.executable, "-c", code])
    peaks = rss.peak_rss(run, 60)
    assert 60 < peaks["child"] < 150, peaks
