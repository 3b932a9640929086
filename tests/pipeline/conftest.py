"""What the pipeline test modules share: the live loop's `tiny` config."""
from __future__ import annotations

import pytest

from recstack.pipeline.live import LiveConfig

# a few steps of small models: checks the loop, not model quality
TINY_OVERRIDES = {
    "retrieval": ("epochs=1", "max_steps=8", "batch_size=128", "dim=8", "user_hidden=16", "item_hidden=16",
                  "ann_eval_queries=20", "num_uniform_negatives=32"),
    "coarse": ("max_steps=8", "batch_size=128", "hidden=32", "eval_max_rows=500"),
    "fine": ("ctr_hidden=16", "cvr_hidden=16", "ctr_max_steps=8", "cvr_max_steps=8", "ctr_batch_size=128",
             "cvr_batch_size=64"),
}


@pytest.fixture(scope="session")
def live_config() -> LiveConfig:
    """`recstack live` on `tiny` for 2 days, in process, with a few steps of small models per stage."""
    return LiveConfig(preset="tiny", days=2, initial_days=3, sessions=30, day_wall_s=0.5, probe_s=0.2,
                      log_roll_s=0.2, train_overrides={k: list(v) for k, v in TINY_OVERRIDES.items()},
                      in_process=True)
