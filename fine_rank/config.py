"""The fine stage's settings: one dataclass (`ctr_*` / `cvr_*` fields per model), every field
settable with `--set key=value`."""
from __future__ import annotations

import math
from dataclasses import dataclass

from recstack.training import sead
from recstack.config import ConfigError, from_dict
from recstack.item_stats import FIELDS as ITEM_STATS_FIELDS

from fine_rank.sequence import SEQUENCES

STAGE = "fine"
N_ITEM_DENSE = 1  # `item_dense` columns from the item table (the normalised log price)
TASKS = ("ctr", "cvr")
OPTIMIZERS = ("adam", "adagrad")
CVR_LABELS = ("purchase", "purchase_observed")
SPLITS = ("test", "valid")
# CVR training methods (PFD Table 4, SEAD Table 2): "none" is the plain student; sd, md,
# lupi, pfd, pfd_md train a `Teacher` synchronously (Eq. 5); mtl predicts each post-event
# feature from a shared first layer; signal_loss is SEAD's consent-limited variant
# "oracle": the simulator's true pCVR as the soft label (fine_rank.oracle): the bound no teacher can pass
CVR_TEACHERS = ("none", "sd", "md", "lupi", "pfd", "pfd_md", "mtl", "signal_loss", "oracle")
# how a teacher that reads the regular inputs (sd, md, pfd, pfd_md) is trained beside the student
# (PFD Table 8): share_sync shares the student's embeddings and trains with it (Eq. 5);
# ind_sync gives the teacher embeddings of its own, trained alongside; ind_async trains that
# teacher to the end first, then the student from its frozen soft labels
CVR_MANNERS = ("share_sync", "ind_sync", "ind_async")
REGULAR_TEACHERS = ("sd", "md", "pfd", "pfd_md")
SEAD_MODES = ("none",) + sead.SELECTORS
CALIBRATIONS = ("none", "labels", "aggregates")


@dataclass
class Config:
    """Fine-ranker training settings; `ctr_*` / `cvr_*` fields configure each model."""

    seed: int = 0  # torch init + shuffling; the CVR model uses seed + 1
    split: str = "test"  # "test": fit days 1..D-1, score day D; "valid": fit 1..D-2, score D-1 (LR sweeps)
    cvr_label: str = "purchase"  # "purchase_observed": only consented users' purchases (signal loss)
    eval_batch_size: int = 8192  # inference batch for held-out scoring (memory only)
    # N > 0: CTR and CVR stream the training days from their Parquet shards, N rows per chunk
    # per rank (recstack.data.shards), each rank reading only its slice; see `StreamRows`
    stream_chunk_rows: int = 0  # 0: materialised in memory (DDP splits each global batch across ranks)
    # CTR: ~237k training impressions on `small`. The id embeddings overfit fast: on
    # `small` one epoch scores a better next-day AUC and log-loss than two
    ctr_emb_dim: int = 16  # per categorical column; 9 columns -> 144 + 8 dense inputs
    ctr_hidden: tuple[int, ...] = (512, 256, 128)  # shared-bottom widths (PFD: 3 layers)
    ctr_optimizer: str = "adam"  # adam | adagrad (PFD's choice; give it lr ~0.01-0.05)
    ctr_lr: float = 1e-3  # Adam's usual default; stable with BatchNorm
    ctr_weight_decay: float = 0.0  # L2 on all weights (passed to the optimizer)
    ctr_batch_size: int = 512  # ~460 steps per epoch on `small`; BatchNorm is stable at this size
    ctr_epochs: int = 1  # passes over the training impressions
    ctr_max_steps: int = 0  # cap on optimizer steps; 0 = no cap
    ctr_lr_decay: bool = True  # linear decay to 0 over the run (see `fit`: calibration)
    # the user's behaviour sequence through target attention (fine_rank.sequence): "din" adds
    # seq_items / seq_extras to the model's (and the exported graph's) inputs; "none" reads none
    ctr_sequence: str = "none"
    ctr_attention_dim: int = 32  # width of the attention's query / key projections
    # CVR: ~20x fewer (clicked) rows, 13 % positives; two epochs beat one and three on `small`
    cvr_emb_dim: int = 16  # as ctr_emb_dim
    cvr_hidden: tuple[int, ...] = (512, 256, 128)  # as ctr_hidden
    cvr_optimizer: str = "adam"  # as ctr_optimizer
    cvr_lr: float = 1e-3  # as ctr_lr
    cvr_weight_decay: float = 0.0  # as ctr_weight_decay
    cvr_batch_size: int = 512  # ~27 steps per epoch on `small`'s clicked rows
    cvr_epochs: int = 2  # passes over the clicked impressions
    cvr_max_steps: int = 0  # cap on optimizer steps; 0 = no cap
    cvr_lr_decay: bool = True  # as ctr_lr_decay
    cvr_sequence: str = "none"  # as ctr_sequence
    cvr_attention_dim: int = 32  # as ctr_attention_dim
    # both models read the candidate's item statistics (recstack.item_stats: its impressions and
    # each event kind per day over the last 1 / 7 whole days, from the full logs) beside its
    # price in `item_dense`; the bundle ships the table of the day after the training days.
    # `small`, validation day, seeds 1-3: CTR AUC +0.007, CVR +0.02 (docs/results/cascade/item_stats.md)
    item_stats: bool = True
    sparse_embeddings: bool = False  # only the looked-up rows get gradients (recstack.training.sparse): ~5x faster steps with 1e6-item tables; needs weight_decay 0, not under torchrun
    # --- distillation (PFD, CVR) -------------------------------------------------------
    cvr_teacher: str = "none"  # one of CVR_TEACHERS; the exported model is always the student
    cvr_md_hidden: tuple[int, ...] = (1024, 512, 512, 256, 128)  # MD / PFD+MD teacher (paper: 8192..128, 7 layers; CPU-sized)
    cvr_manner: str = "share_sync"  # one of CVR_MANNERS; the paper's main CVR runs share the embeddings
    distill_lambda: float = 0.5  # λ of Eq. 5 (PFD's default)
    distill_warmup: float = 0.1  # fraction of steps with λ = 0 (Algorithm 1's swap step k; ind_async: none, its teacher is trained)
    mtl_weight: float = 0.1  # weight of each auxiliary MTL loss (PFD picks from 0.01..2, "balanced")
    mtl_hidden: tuple[int, ...] = (256, 128)  # each MTL task tower on the shared first layer (paper: 2 layers)
    # --- SEAD (CTR and CVR) ---------------------------------------------------------------
    ctr_sead: str = "none"  # one of SEAD_MODES: the auxiliary head's label selector (none = no aux head)
    cvr_sead: str = "none"  # as ctr_sead
    sead_weight: float = 1.0  # weight of the auxiliary loss
    sead_aux_width: int = 64  # the auxiliary tower's width (its branches: half); also the signal-loss teacher's aux head
    sead_sga: bool = False  # SGA ablation: the aux loss does not update the shared bottom / embeddings
    sead_pos_weight: float = 3.0  # curriculum: positives' initial weight, decaying to 1 ...
    sead_curriculum_until: float = 0.5  # ... at this fraction of training
    # --- calibration ------------------------------------------------------------------------
    # A global shift of the exported head's bias after training, fitted on the training rows
    # (the ordering, hence AUC, is unchanged). "labels": mean prediction = the training label
    # mean (a short run, or a distilled student learning from a teacher's soft labels, ends a
    # few % off). "aggregates" (CVR only): = the aggregated conversion rate of the training
    # days (signal loss: the per-example labels undercount conversions, the daily
    # per-category counts do not)
    ctr_calibrate: str = "none"
    # measured on `small`, validation day, seeds 1-3, lr 2e-3 (mean prediction / mean true
    # pCVR): baseline 0.99-1.01 without, 1.005-1.01 with; PFD student 1.10-1.18 without,
    # 1.003-1.008 with (its teacher's soft labels run high on the training rows)
    cvr_calibrate: str = "labels"
    # The fraction of each calibrated task's training rows kept out of fitting; the shift is then
    # fitted on them, so the mean prediction matches the target on rows the model has not
    # memorised. 0: fitted on the training rows themselves. Measured on `medium` (CVR baseline,
    # 2 epochs, 10 seeds, test day; docs/results/cvr/calibration_holdout): mean prediction / mean
    # label 1.11-1.17 fitted on the training rows, 1.00-1.04 on a 10 % slice held out, at a cost
    # of -0.0044 AUC (the rows not trained on), hence off by default. In memory only.
    calibration_holdout: float = 0.0

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.cvr_label not in CVR_LABELS:
            raise ConfigError(f"cvr_label must be one of {CVR_LABELS}, got {self.cvr_label!r}")
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size must be >= 1")
        if self.stream_chunk_rows < 0:
            raise ConfigError(f"stream_chunk_rows must be >= 0 (0: in memory), got {self.stream_chunk_rows}")
        for task in TASKS:
            self.settings(task).validate(task)
        if self.cvr_teacher not in CVR_TEACHERS:
            raise ConfigError(f"cvr_teacher must be one of {CVR_TEACHERS}, got {self.cvr_teacher!r}")
        for task in TASKS:
            if getattr(self, f"{task}_sead") not in SEAD_MODES:
                raise ConfigError(f"{task}_sead must be one of {SEAD_MODES}, got {getattr(self, f'{task}_sead')!r}")
        if self.cvr_manner not in CVR_MANNERS:
            raise ConfigError(f"cvr_manner must be one of {CVR_MANNERS}, got {self.cvr_manner!r}")
        if self.cvr_manner != "share_sync" and self.cvr_teacher not in REGULAR_TEACHERS:
            raise ConfigError(f"cvr_manner={self.cvr_manner} needs a teacher that reads the regular inputs "
                              f"(cvr_teacher one of {REGULAR_TEACHERS}), got cvr_teacher={self.cvr_teacher!r}")
        if self.cvr_teacher != "none" and self.cvr_sead != "none":
            raise ConfigError("cvr_teacher and cvr_sead are separate methods; set one of them")
        if self.cvr_teacher == "signal_loss" and (self.cvr_label != "purchase_observed" or self.cvr_calibrate == "labels"):
            raise ConfigError("cvr_teacher=signal_loss learns from the consent-limited stream and is calibrated to the "
                              "aggregates: set cvr_label=purchase_observed and cvr_calibrate=aggregates (or none)")
        if not 0.0 <= self.calibration_holdout < 1.0:
            raise ConfigError(f"calibration_holdout must be in [0, 1), got {self.calibration_holdout}")
        if self.calibration_holdout > 0 and self.stream_chunk_rows > 0:
            raise ConfigError("calibration_holdout needs the in-memory path: set stream_chunk_rows=0 or calibration_holdout=0")
        if self.cvr_calibrate not in CALIBRATIONS:
            raise ConfigError(f"cvr_calibrate must be one of {CALIBRATIONS}, got {self.cvr_calibrate!r}")
        if self.ctr_calibrate not in CALIBRATIONS[:2]:
            raise ConfigError(f"ctr_calibrate must be one of {CALIBRATIONS[:2]}, got {self.ctr_calibrate!r}")
        if not 0 <= self.distill_lambda <= 1 or not 0 <= self.distill_warmup < 1:
            raise ConfigError("distill_lambda must be in [0, 1] and distill_warmup in [0, 1)")
        if self.mtl_weight < 0 or self.sead_weight < 0 or not self.cvr_md_hidden or not self.mtl_hidden:
            raise ConfigError("mtl_weight, sead_weight >= 0 and non-empty cvr_md_hidden, mtl_hidden required")
        if self.sead_aux_width < 2:
            raise ConfigError(f"sead_aux_width must be >= 2, got {self.sead_aux_width}")
        if self.sead_pos_weight < 1 or not 0 < self.sead_curriculum_until <= 1:
            raise ConfigError("sead_pos_weight >= 1 and 0 < sead_curriculum_until <= 1 required")

    @property
    def uses_sequence(self) -> bool:
        """Whether either model reads the behaviour sequence (its rows then carry seq_items / seq_extras)."""
        return any(self.settings(t).sequence != "none" for t in TASKS)

    def settings(self, task: str) -> "ModelSettings":
        """The `ctr_*` or `cvr_*` fields as one object."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        shared = {"sparse_embeddings": self.sparse_embeddings, "item_stats": self.item_stats}
        return ModelSettings(**{f: getattr(self, f"{task}_{f}") for f in ModelSettings.__dataclass_fields__ if f not in shared},
                             **shared)

    def __post_init__(self) -> None:
        for name in ("ctr_hidden", "cvr_hidden", "cvr_md_hidden", "mtl_hidden"):
            setattr(self, name, tuple(getattr(self, name)))
        self.validate()


@dataclass(frozen=True)
class ModelSettings:
    """Settings of one model (CTR or CVR); see the matching fields of `Config`."""

    emb_dim: int
    hidden: tuple[int, ...]
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    max_steps: int
    lr_decay: bool
    sequence: str
    attention_dim: int
    sparse_embeddings: bool = False
    item_stats: bool = False

    @property
    def n_item_dense(self) -> int:
        """Columns of the model's `item_dense`: the price, then the item statistics when read."""
        return N_ITEM_DENSE + (len(ITEM_STATS_FIELDS) if self.item_stats else 0)

    def validate(self, task: str) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{task}_optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.sequence not in SEQUENCES:
            raise ConfigError(f"{task}_sequence must be one of {SEQUENCES}, got {self.sequence!r}")
        if self.attention_dim < 1:
            raise ConfigError(f"{task}_attention_dim must be >= 1, got {self.attention_dim}")
        if self.emb_dim < 1 or not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"{task}_emb_dim and {task}_hidden must be positive")
        # BatchNorm needs at least two rows per training batch
        if self.batch_size < 2 or self.epochs < 1 or self.max_steps < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"{task}: batch_size >= 2, epochs >= 1, max_steps >= 0, lr > 0, weight_decay >= 0 required")

    def steps(self, n_rows: int) -> int:
        per_epoch = math.ceil(n_rows / self.batch_size)
        total = per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total



# what a checkpoint that does not name a field was trained with: the fields added since, at
# the value that reproduces the older models (a default may change; an old model may not)
_BEFORE_FIELDS = {"ctr_sequence": "none", "cvr_sequence": "none", "item_stats": False}


def checkpoint_config(d: dict) -> Config:
    """A checkpoint's config dict -> Config; a checkpoint from before the sequence or the item
    statistics option rebuilds the model it holds (without them), whatever the default is today."""
    return from_dict(Config, {**_BEFORE_FIELDS, **d})
