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


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for the module's tests (restored after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
