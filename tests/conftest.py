"""Shared fixtures: one `tiny` world per test session."""
from __future__ import annotations

import os

import pytest

# keep the suite polite on a shared 2-core machine
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """Path to a simulated `tiny` world (seed 0)."""
    from recstack.world import preset, simulate

    out = tmp_path_factory.mktemp("tiny_world")
    simulate(preset("tiny"), seed=0, out=out, preset="tiny", progress=False)
    return str(out)
