"""The coarse-ranker tables' plan (`CoarsePlan`) and the protocol's day windows."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

from recstack.config import ConfigError
from recstack.data import SimData
from recstack.evaluation.protocol import ExperimentPlan

from coarse_rank.train import MANNERS, TEACHERS

QUICK = dict(embed_dim=8, d_model=32, n_heads=4, ff_dim=64, hidden=(64,), out_dim=32, teacher_hidden=(64, 32),
             batch_size=256, epochs=1, max_steps=12, warmup_steps=4, swap_step=4, eval_max_rows=2000)


@dataclass(frozen=True)
class CoarsePlan(ExperimentPlan):
    """The plan of a coarse-ranker table (PFD Tables 2, 5 and 7)."""

    lrs: tuple[float, ...] = (0.025, 0.05, 0.1)
    fractions: tuple[float, ...] = (0.25, 0.5)  # shares of the train window's sessions; 1x (and 2x) always run
    methods: Optional[tuple[str, ...]] = TEACHERS  # the coarse table's rows (the baseline among them)
    base_days: int = 3  # days in the fit and train windows
    lams: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # λ values of the lambda table
    manners: tuple[str, ...] = MANNERS  # training manners of the manner table
    control_data: str = ""  # a world simulated with privileged_strength=0: the coarse table's control
    double: bool = True  # run the baseline at 2x (more days) when the world has them
    control_methods: tuple[str, ...] = ("baseline", "pfd", "pfd_md")  # the control's rows
    cache: str = ""  # a folder keeping every fit's metrics and predictions, reused across tables
    selected_lrs: dict[str, float] = dataclasses.field(default_factory=dict)  # method:lr pairs that skip the sweep

    EXPERIMENTS: ClassVar[tuple[str, ...]] = ("coarse", "lambda", "manner")
    QUICK: ClassVar[dict] = {"lrs": (0.05,), "lams": (0.3, 0.7), "fractions": (0.5,)}

    def choices(self) -> dict[str, tuple[str, ...]]:
        return {"methods": TEACHERS, "control_methods": TEACHERS, "manners": MANNERS}

    def validate(self) -> None:
        super().validate()
        if self.methods is None:
            raise ConfigError(f"methods: name the rows to run; choose from {list(TEACHERS)}")
        if self.experiment == "coarse" and "baseline" not in self.methods:
            raise ConfigError(f"methods: the coarse table needs the baseline (every Δ is to it), got {list(self.methods)}")
        if self.base_days < 1:
            raise ConfigError(f"base_days: must be >= 1, got {self.base_days}")

    def record(self) -> dict:
        """The plan's part of results.json."""
        keys = ("lrs", "base_days", "methods", "lams", "manners", "fractions", "control_data", "double",
                "control_methods", "workers", "cache", "selected_lrs")
        return {k: getattr(self, k) for k in keys}


def windows(data: SimData, base_days: int) -> dict:
    """Day windows: fit (LR sweep) -> valid day, train -> test day, and the 2x window if the
    world has enough days."""
    d = data.n_days
    valid, test = d - 1, d
    fit_days = list(range(max(1, valid - base_days), valid))
    train_days = list(range(max(1, test - base_days), test))
    double = list(range(test - 2 * len(train_days), test)) if test - 2 * len(train_days) >= 1 else None
    return {"fit": fit_days, "valid": valid, "train": train_days, "test": test, "double": double}
