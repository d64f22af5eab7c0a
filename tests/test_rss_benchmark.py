"""The RSS benchmark's measurement: a child's own peak, not that of the process that forked it."""

from __future__ import annotations

from pathlib import Path

from benchmarks import rss


def test_peak_is_the_childs_own_not_the_forking_parents(tmp_path: Path) -> None:
    held = bytearray(400_000_000)  # this process is far bigger than the child will be
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page: resident, not just reserved
    code = "x = bytearray(60_000_000); x[::4096] = b'1' * len(x[::4096])"
    peaks = rss._run({"child": ["-c", code]}, {}, tmp_path, 60)
    assert 60 < peaks["child"] < 150, peaks
