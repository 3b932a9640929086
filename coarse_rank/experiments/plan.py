"""The coarse-ranker tables' plan (`CoarsePlan`) and the protocol's day windows."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

from recstack.config import ConfigError
from recstack.data import SimData
from recstack.evaluation.protocol import ExperimentPlan

from coarse_rank.train import MANNERS, TEACHERS

# The coarse table's rows: name -> the Config changes that make it. Besides one row per
# teacher, the controls the protocol asks for: SD trained alongside with λ = 0 (the second
# head alone, no distillation: what a teacher's mere presence does to the shared
# components), the baseline with its own weight-decay sweep (what plain regularisation buys),
# and the oracle with λ = 1 (the truth as the only label).
ROWS: dict[str, dict] = {t: {"teacher": t} for t in TEACHERS}
ROWS.update({"sd_lam0": {"teacher": "sd", "lam": 0.0}, "oracle_lam1": {"teacher": "oracle", "lam": 1.0},
             "baseline_wd": {"teacher": "baseline"}})
ROW_NAMES = tuple(ROWS)
# the paired contrasts of the coarse table (method, reference), each over every seed
CONTRASTS = (("pfd", "sd"), ("pfd_md", "md"), ("pfd", "baseline"), ("pfd_md", "baseline"))
# the teachers a λ can weigh: every one but the baseline, which distils nothing
DISTILLED = tuple(t for t in TEACHERS if t != "baseline")
MIN_CONTRAST_SEEDS = 10  # the protocol's paired seeds for a contrast; fewer is reported as PARTIAL

QUICK = dict(embed_dim=8, d_model=32, n_heads=4, ff_dim=64, hidden=(64,), out_dim=32, teacher_hidden=(64, 32),
             batch_size=256, epochs=1, max_steps=12, warmup_steps=4, swap_step=4, eval_max_rows=2000)


@dataclass(frozen=True)
class CoarsePlan(ExperimentPlan):
    """The plan of a coarse-ranker table (PFD Tables 2, 5 and 7)."""

    lrs: tuple[float, ...] = (0.025, 0.05, 0.1)
    fractions: tuple[float, ...] = (0.25, 0.5)  # shares of the train window's sessions; 1x (and 2x) always run
    methods: Optional[tuple[str, ...]] = ROW_NAMES  # the coarse table's rows (the baseline among them)
    select_seeds: int = 3  # the LR (and weight decay) is the best mean validation AUC over the first this many seeds
    weight_decays: tuple[float, ...] = (1e-5, 1e-4, 1e-3)  # baseline_wd's sweep, jointly with the LRs
    data_days: tuple[int, ...] = (2, 4, 8)  # the data axis: train windows of this many days before the test day
    data_methods: tuple[str, ...] = ("baseline", "pfd", "pfd_md")  # the data axis' rows
    base_days: int = 3  # days in the fit and train windows
    lams: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # λ values of the lambda table
    lambda_methods: tuple[str, ...] = ("lupi", "md", "pfd", "pfd_md")  # the lambda table's rows (PFD Table 5's)
    manners: tuple[str, ...] = MANNERS  # training manners of the manner table
    control_data: str = ""  # a world simulated with privileged_strength=0: the coarse table's control
    double: bool = True  # run the baseline at 2x (more days) when the world has them
    control_methods: tuple[str, ...] = ("baseline", "pfd", "pfd_md", "oracle")  # the control's rows
    cache: str = ""  # a folder keeping every fit's metrics and predictions, reused across tables
    selected_lrs: dict[str, float] = dataclasses.field(default_factory=dict)  # method:lr pairs that skip the sweep
    select_only: bool = False  # stop after the LR sweep: report each row's curve and choice, fit nothing on the test day

    EXPERIMENTS: ClassVar[tuple[str, ...]] = ("coarse", "lambda", "manner")
    QUICK: ClassVar[dict] = {"lrs": (0.05,), "lams": (0.3, 0.7), "fractions": (0.5,), "select_seeds": 1,
                             "weight_decays": (1e-4,), "data_days": (1,)}

    def choices(self) -> dict[str, tuple[str, ...]]:
        return {"methods": ROW_NAMES, "control_methods": ROW_NAMES, "manners": MANNERS, "data_methods": ROW_NAMES,
                "lambda_methods": DISTILLED}

    def validate(self) -> None:
        super().validate()
        if self.methods is None:
            raise ConfigError(f"methods: name the rows to run; choose from {list(TEACHERS)}")
        if self.experiment == "coarse" and "baseline" not in self.methods:
            raise ConfigError(f"methods: the coarse table needs the baseline (every Δ is to it), got {list(self.methods)}")
        if not 1 <= self.select_seeds <= len(self.seeds):
            raise ConfigError(f"select_seeds: must be in [1, {len(self.seeds)}] (the plan's seeds), got {self.select_seeds}")
        if not self.quick and self.select_seeds < 3:
            raise ConfigError(f"select_seeds: the protocol selects by the mean over >= 3 seeds, got {self.select_seeds}")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ConfigError(f"weight_decays: need at least one value >= 0, got {list(self.weight_decays)}")
        if any(n < 1 for n in self.data_days):
            raise ConfigError(f"data_days: each must be >= 1, got {list(self.data_days)}")
        if self.experiment == "lambda" and not self.lambda_methods:
            raise ConfigError(f"lambda_methods: name at least one of {list(DISTILLED)}")
        if self.base_days < 1:
            raise ConfigError(f"base_days: must be >= 1, got {self.base_days}")
        if self.select_only and self.experiment != "coarse":
            raise ConfigError(f"select_only: only the coarse table has an LR sweep to stop after, not {self.experiment!r}")

    def record(self) -> dict:
        """The plan's part of results.json."""
        keys = ("lrs", "base_days", "methods", "lams", "manners", "fractions", "control_data", "double",
                "control_methods", "workers", "cache", "selected_lrs", "select_only", "select_seeds", "weight_decays", "data_days",
                "data_methods", "lambda_methods")
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
