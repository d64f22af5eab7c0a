"""The lab's phase times, and what its hosts' boots reported, printed at the end of every pytest
run that ran the lab (CI's log)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

# phase name -> (seconds, outcome); filled by the fixture below and by test_lab's `lab` fixture.
PHASES: dict[str, tuple[float, str]] = {}
# Lines of `lab.sh up`/`boot` worth keeping from a run that passed: hosts that booted degraded.
BOOT_NOTES: list[str] = []


@pytest.fixture(scope="session")
def lab_phase_times() -> dict[str, tuple[float, str]]:
    """Where the lab fixture records its own up and down."""
    return PHASES


def _keep_degraded_boot(stderr: str) -> None:
    lines = stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if " booted degraded: " in line), None)
    if first is not None:  # from the first degraded host on (not the rootfs build's lines)
        BOOT_NOTES.extend(lines[first:])


@pytest.fixture(scope="session")
def keep_degraded_boot() -> Callable[[str], None]:
    """Keep what `lab.sh up`/`boot` printed (stderr) if a host booted degraded: the failed
    units' status, for the run's summary."""
    return _keep_degraded_boot


@pytest.fixture(autouse=True)
def _time_lab_phase(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    name = request.node.name.removeprefix("test_")
    report = getattr(request.node, "rep_call", None)
    PHASES[name] = (time.monotonic() - started, report.outcome if report else "error/skipped")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not PHASES:
        return
    terminalreporter.section("lab phases")
    for name, (seconds, outcome) in PHASES.items():
        terminalreporter.write_line(f"{seconds:7.1f} s  {outcome:8}  {name}")
    total = sum(seconds for seconds, _ in PHASES.values())
    terminalreporter.write_line(f"{total:7.1f} s  total")
    if BOOT_NOTES:
        terminalreporter.section("lab boots that came up degraded")
        for line in BOOT_NOTES:
            terminalreporter.write_line(line)
