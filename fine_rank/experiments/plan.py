"""The fine-ranker tables' rows (`Method`) and their plan (`FinePlan`): the learning-rate sweep,
the data fractions and the method subsets `--set` may choose."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from recstack.config import ConfigError
from recstack.evaluation.protocol import ExperimentPlan

LRS = (5e-4, 1e-3, 2e-3, 4e-3)  # the sweep every method gets (Adam; on small most methods chose 2e-3, so the grid goes one step past it)
QUICK_LRS = (1e-3, 2e-3)
FRACTIONS = (0.25, 0.5, 1.0)  # baseline data sizes for the data-equivalent multiplier
LAMBDAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # PFD Table 6
QUICK_LAMBDAS = (0.1, 0.5)
QUICK = dict(ctr_hidden=(32, 16), cvr_hidden=(32, 16), cvr_md_hidden=(64, 32, 16), mtl_hidden=(16, 8),
             ctr_emb_dim=4, cvr_emb_dim=4, ctr_max_steps=20, cvr_max_steps=10, ctr_batch_size=256, cvr_batch_size=128)


@dataclass(frozen=True)
class Method:
    """One row of a table: a name, its task, and the Config overrides that make it."""

    name: str
    task: str  # "ctr" | "cvr"
    changes: tuple[str, ...] = ()
    lr_times_baseline: float = 0.0  # > 0: no sweep, this multiple of the baseline's chosen LR (SEAD's "LR")
    rows: str = "all"  # "consented": train on consented users' rows only
    note: str = ""
    # method-specific settings swept together with the LR on the validation day (each entry
    # a tuple of overrides); the LR sweep itself is the same for every method
    grid: tuple[tuple[str, ...], ...] = ((),)


CVR_METHODS = (
    Method("baseline", "cvr", note="student alone"),
    Method("sd", "cvr", ("cvr_teacher=sd",), note="SD control: teacher = student architecture, no privileged features"),
    Method("mtl", "cvr", ("cvr_teacher=mtl",), note="MTL: shared first layer, one tower per post-event feature"),
    Method("lupi", "cvr", ("cvr_teacher=lupi",), note="teacher on post-event features only"),
    Method("md", "cvr", ("cvr_teacher=md",), note="wider/deeper teacher, regular features"),
    Method("pfd", "cvr", ("cvr_teacher=pfd",), note="teacher on regular + post-event features"),
    Method("pfd_md", "cvr", ("cvr_teacher=pfd_md",), note="PFD with the MD teacher widths"),
    # PFD Table 8: PFD+MD trained in the other manners (pfd_md above is Share&Sync)
    Method("pfd_md_ind_sync", "cvr", ("cvr_teacher=pfd_md", "cvr_manner=ind_sync"),
           note="PFD+MD, the teacher with embeddings of its own, trained alongside (Ind&Sync)"),
    Method("pfd_md_ind_async", "cvr", ("cvr_teacher=pfd_md", "cvr_manner=ind_async"),
           note="PFD+MD, the teacher with embeddings of its own trained first, then frozen (Ind&Async)"),
    # the λ table (Table 6) is read on the test day; this row chooses λ the fair way
    Method("pfd_lam", "cvr", ("cvr_teacher=pfd",), grid=tuple((f"distill_lambda={lam}",) for lam in (0.1, 0.3, 0.5, 0.7, 0.9)),
           note="PFD with λ chosen on the validation day from {0.1, 0.3, 0.5, 0.7, 0.9}, jointly with the LR"),
    Method("sd_lam0", "cvr", ("cvr_teacher=sd", "distill_lambda=0"),
           note="control: the SD teacher trained alongside with λ = 0 (a second head only, no distillation)"),
    Method("oracle_teacher", "cvr", ("cvr_teacher=oracle", "distill_lambda=0.5"),
           note="bound: the simulator's true pCVR as the soft label, λ = 0.5"),
    Method("oracle_teacher_lam1", "cvr", ("cvr_teacher=oracle", "distill_lambda=1.0"),
           note="bound: the true pCVR as the only label (λ = 1)"),
)


def sead_methods(task: str) -> tuple[Method, ...]:
    """SEAD Table 1's rows for `task` ("ctr" or "cvr")."""
    k = f"{task}_sead"
    # no post-hoc recalibration: SEAD's claim is that the main head stays calibrated on its own
    raw = (f"{task}_calibrate=none",)
    return (
        Method("baseline", task, raw, note="main head alone"),
        Method("sead_max", task, raw + (f"{k}=max",), note="aux on max(y, y')"),
        Method("sead_min", task, raw + (f"{k}=min",), note="aux on min(y, y')"),
        Method("sead_curriculum", task, raw + (f"{k}=curriculum",), note="max(y, y'), positives x3 early, decaying to x1 at half-way"),
        Method("ogl", task, raw + (f"{k}=ogl",), note="aux on original labels y"),
        Method("dtl", task, raw + (f"{k}=dtl",), note="aux on distillation labels y'"),
        Method("positives_only", task, raw + (f"{k}=positives_only",), note="aux on positive rows only"),
        Method("sga", task, raw + (f"{k}=max", "sead_sga=true"), note="max(y, y'), aux gradient stopped at the shared bottom"),
        Method("lr2x", task, raw, lr_times_baseline=2.0, note="no aux, twice the baseline's chosen LR"),
    )


SIGNAL_BASE = ("cvr_label=purchase_observed", "cvr_calibrate=none")
SIGNAL_METHODS = (
    Method("baseline", "cvr", SIGNAL_BASE, note="biased per-example labels (non-consented conversions are 0)"),
    Method("baseline_aggcal", "cvr", SIGNAL_BASE + ("cvr_calibrate=aggregates",), note="baseline, bias shifted to the aggregates"),
    Method("consented_only", "cvr", SIGNAL_BASE, rows="consented", note="consented users' rows only (unbiased, fewer rows)"),
    Method("sead_signal", "cvr", SIGNAL_BASE + ("cvr_teacher=signal_loss", "cvr_calibrate=aggregates"),
           note="teacher main on consented, aux on biased; student on max(y, y'), calibrated to the aggregates"),
    Method("sead_signal_wu", "cvr", SIGNAL_BASE + ("cvr_teacher=signal_loss", "cvr_calibrate=aggregates"),
           grid=(("distill_warmup=0.1",), ("distill_warmup=0.5",)),
           note="sead_signal with the student's warm-up (steps on y before max(y, y')) chosen on the validation day from {0.1, 0.5}"),
    Method("oracle", "cvr", ("cvr_label=purchase", "cvr_calibrate=none"), note="full labels (unavailable in practice): the ceiling"),
)

# the tables of each experiment, by task: the rows a method subset is chosen from
TABLES = {"cvr": {"cvr": CVR_METHODS}, "sead": {t: sead_methods(t) for t in ("ctr", "cvr")},
          "signal-loss": {"cvr": SIGNAL_METHODS}}
# the keys that choose a subset of the rows, by experiment (signal-loss always runs every row)
SUBSET_KEYS = {"cvr": ("methods", "cvr_methods"), "sead": ("methods", "ctr_methods", "cvr_methods"), "signal-loss": ()}


@dataclass(frozen=True)
class FinePlan(ExperimentPlan):
    """The plan of a fine-ranker table. `methods=` keeps only these rows of every task's table
    (the baseline always: every Δ is to it); `ctr_methods=` / `cvr_methods=` one task's."""

    lrs: tuple[float, ...] = LRS
    fractions: tuple[float, ...] = FRACTIONS  # 1.0 is always added
    ctr_methods: Optional[tuple[str, ...]] = None  # the CTR table's rows (sead); None: as `methods`
    cvr_methods: Optional[tuple[str, ...]] = None  # the CVR table's rows (cvr, sead); None: as `methods`
    streaming: bool = False  # sead / signal-loss: train one pass per day through the world, score each next day
    last_days: int = 5  # streaming: the main metric averages the next-day AUC of this many last days
    # streaming sweep (empty stream_lrs: every row at the config's LR, no sweep): each row's LR,
    # and its aux-loss weight if it has an aux tower, chosen on the `valid_days` scored days
    # before the last_days window, averaged over the first `select_seeds` seeds
    stream_lrs: tuple[float, ...] = ()
    stream_aux_weights: tuple[float, ...] = (1.0,)
    valid_days: int = 3
    # the LR (and grid setting) is the best mean validation score over the first this many seeds;
    # None: the experiment's default, 3 for the streaming sweep and 1 (the first seed) for a table
    select_seeds: Optional[int] = None
    # the rows swept (None: every row); an unswept row with an aux tower runs at sead_max's
    # chosen setting (an ablation of the tuned method), one without at the baseline's LR
    stream_swept: Optional[tuple[str, ...]] = None
    tasks: Optional[tuple[str, ...]] = None  # streaming: run only these tasks' tables (None: all)
    # a folder keeping each table fit's predictions, keyed by the world and the fit's whole Config,
    # phase, seed and data share: a rerun (or another table) reuses them, so an interrupted table resumes
    cache: str = ""
    # 0: the test fit trains on every day before the test day, one more than the LR sweep's fits
    # had; N: every fit trains on the N days before the day it is scored on, so the test fit
    # sees as many rows (and steps) as the fits its LR was chosen on
    window_days: int = 0

    EXPERIMENTS: ClassVar[tuple[str, ...]] = tuple(TABLES)
    MIN_SEEDS: ClassVar[int] = 2
    QUICK: ClassVar[dict] = {"lrs": QUICK_LRS, "fractions": (0.5, 1.0)}

    def validate(self) -> None:
        super().validate()
        if self.window_days < 0 or (self.window_days and self.streaming):
            raise ConfigError(f"window_days: a number of days >= 0 for the tables (not streaming), got {self.window_days}")
        if self.cache and self.streaming:
            raise ConfigError("cache: the streamed runs keep their own cache under --out; set cache for the tables only")
        if self.stream_lrs and not self.streaming:
            raise ConfigError("stream_lrs: the validation-window sweep needs streaming=true")
        if self.stream_lrs and (min(self.stream_lrs) <= 0 or not self.stream_aux_weights or min(self.stream_aux_weights) < 0):
            raise ConfigError(f"stream_lrs / stream_aux_weights: need positive LRs and non-negative weights, got "
                              f"{list(self.stream_lrs)} / {list(self.stream_aux_weights)}")
        if self.tasks is not None and (not self.streaming or not set(self.tasks) <= set(TABLES.get(self.experiment, {}))):
            raise ConfigError(f"tasks: needs streaming=true and a subset of {list(TABLES.get(self.experiment, {}))}, "
                              f"got {list(self.tasks)}")
        if self.stream_swept is not None and "sead_max" not in self.stream_swept and self.experiment == "sead":
            raise ConfigError("stream_swept: must include sead_max (the unswept aux rows take its chosen setting)")
        if (self.stream_lrs or not self.streaming) and not 1 <= self.n_select_seeds() <= len(self.seeds):
            raise ConfigError(f"select_seeds: must be in [1, {len(self.seeds)}] (the seeds given), got {self.n_select_seeds()}")

    def n_select_seeds(self) -> int:
        """How many of the first seeds choose each row's LR: `select_seeds`, or the experiment's default."""
        if self.select_seeds is not None:
            return self.select_seeds
        return 3 if self.streaming else 1

    def set_keys(self) -> tuple[str, ...]:
        subset = SUBSET_KEYS.get(self.experiment, ())
        return tuple(k for k in super().set_keys() if k not in ("methods", "ctr_methods", "cvr_methods") or k in subset)

    def choices(self) -> dict[str, tuple[str, ...]]:
        tables = TABLES.get(self.experiment, {})
        names = {task: tuple(m.name for m in rows) for task, rows in tables.items()}
        out = {}
        for key in SUBSET_KEYS.get(self.experiment, ()):
            task = key.split("_")[0] if key != "methods" else next(iter(names))
            out[key] = names[task]
        return out

    def data_fractions(self) -> tuple[float, ...]:
        """The baseline's data curve: the given fractions and the full data."""
        return tuple(sorted(set(self.fractions) | {1.0}))

    def subsets(self) -> dict[str, tuple[str, ...]]:
        """{task: the row names kept, in table order, baseline first} for the tasks given a subset."""
        out = {}
        for task, rows in TABLES.get(self.experiment, {}).items():
            chosen = getattr(self, f"{task}_methods") if f"{task}_methods" in SUBSET_KEYS[self.experiment] else None
            chosen = chosen if chosen is not None else self.methods
            if chosen is not None:
                out[task] = tuple(m.name for m in rows if m.name == "baseline" or m.name in chosen)
        return out

    def rows(self, task: str) -> tuple[Method, ...]:
        """The rows of `task`'s table this plan runs."""
        keep = self.subsets().get(task)
        return tuple(m for m in TABLES[self.experiment][task] if keep is None or m.name in keep)

    def record(self) -> dict:
        """The plan's part of results.json."""
        out = {"lrs": list(self.lrs), "overrides": list(self.overrides), "fractions": list(self.data_fractions()),
               "method_subsets": {t: list(v) for t, v in self.subsets().items()}}
        if not self.streaming:
            out["select_seeds"] = self.n_select_seeds()
            out["window_days"] = self.window_days
        if self.streaming:
            out["stream"] = {"last_days": self.last_days, "valid_days": self.valid_days, "select_seeds": self.n_select_seeds(),
                             "stream_lrs": list(self.stream_lrs), "stream_aux_weights": list(self.stream_aux_weights),
                             "stream_swept": None if self.stream_swept is None else list(self.stream_swept),
                             "tasks": None if self.tasks is None else list(self.tasks)}
        return out

