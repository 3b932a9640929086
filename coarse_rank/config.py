"""The coarse stage's settings: one dataclass, every field settable with `--set key=value`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from recstack.config import ConfigError, from_dict
from recstack.item_stats import FIELDS as ITEM_STATS_FIELDS

# "oracle": no teacher network; the soft labels are the simulator's true pCTR of each training
# impression (the best any teacher could know): the upper bound of what distillation can add
TEACHERS = ("baseline", "sd", "lupi", "md", "pfd", "pfd_md", "oracle")
MANNERS = ("ind_async", "ind_sync", "share_sync", "share_star_sync")
OPTIMIZERS = ("adagrad", "adam")
# the LR after the warm-up: "constant" (the paper's, for its 1e9 examples), or "linear", falling
# linearly to 0 at the last step. At ~1e6 impressions a constant LR ends each fit at a random
# point of a noisy path (medium's validation AUC moves by ~0.005 between checkpoints 235 steps
# apart in the last half of the epoch); the decay ends it at the path's average
LR_SCHEDULES = ("constant", "linear")
SPLITS = ("test", "valid")
# what the served coarse score ranks by (coarse_rank/objective.py): "ctr", the paper's click
# logit; "gmv", log pCTR + log pCVR + log price, the fine stage's pCTR x pCVR x price in logs
OBJECTIVES = ("ctr", "gmv")


@dataclass
class Config:
    # --- model (PFD §5) ---
    embed_dim: int = 16  # per categorical field; 9 fields, so the towers see 64 (user) / 80 (item) embedding dims
    d_model: int = 128  # attention width: 4 heads x subspace 32, as in the paper
    n_heads: int = 4  # attention heads (paper: 4)
    ff_dim: int = 256  # hidden width of the attention layer's feed-forward network
    hidden: tuple[int, ...] = (512, 256)  # tower MLP widths before the output layer (paper: 512 -> 256 -> 128)
    out_dim: int = 128  # user / item vector size (paper: 128); the serving contract assumes 128
    scale: float = 5.0  # logit = scale * <u, v>; compensates for l2 normalisation (paper: 5)
    # --- optimisation ---
    optimizer: str = "adagrad"  # "adagrad" (paper) or "adam"
    lr: float = 0.05  # peak learning rate after warm-up; the paper's 0.01 is for 1e9 examples, ours are ~1e5
    warmup_steps: int = 50  # linear LR warm-up from ~0 to lr over these steps (paper: 1e6 of its steps)
    lr_schedule: str = "constant"  # one of LR_SCHEDULES: after the warm-up, "constant" (paper) or "linear" decay to 0
    weight_decay: float = 0.0  # L2 penalty passed to the optimizer (0: none, as in the paper)
    batch_size: int = 512  # impressions per step (paper: 1024; smaller = more updates on a CPU budget)
    epochs: int = 1  # passes over the training days (paper: 1)
    sparse_embeddings: bool = False  # only the looked-up rows get gradients (recstack.training.sparse): ~5x faster steps with 1e6-item tables; needs weight_decay 0, not under torchrun
    max_steps: int = 500  # cap on optimizer steps (0 = no cap): ~1 epoch of `small` (~463 steps), keeps larger worlds at ~1-2 min
    seed: int = 0  # seeds parameter init and the shuffling order
    length_buckets: int = 4  # speed-up only (exact): encode sequences in groups of similar length, see UserTower.encode_sequence
    # --- served objective (coarse_rank/objective.py) ---
    objective: str = "gmv"  # one of OBJECTIVES; gmv keeps more of the oracle through the coarse cut on the validation day (docs/results/cascade); "ctr" for the PFD tables
    cvr_hidden: tuple[int, ...] = (64,)  # the gmv student's item-only CVR head widths
    # N > 0: the fine ranker's order over retrieved candidates is distilled into the served score
    # (coarse_rank.fine_distill): N x the pairwise loss of its top fine_distill_top against the rest
    fine_distill: float = 0.0  # 0: off; needs objective gmv and fine_targets
    fine_targets: Optional[str] = None  # the targets file of the split's training days (python -m recstack.pipeline.fine_targets)
    fine_distill_requests: int = 32  # requests of the targets file per step
    fine_distill_pairs: int = 128  # candidates per side per request: that many of the fine top, that many of the rest
    fine_distill_top: int = 50  # the fine ranker's top the cut should keep: the served list (small, validation day: 50 kept more than 200)
    item_stats: bool = True  # the item tower (and the teachers' item side) also reads the item statistics (recstack.item_stats) after the price; export folds the serving day's into the item vectors; `small`, validation day, seeds 1-3: GMV@50 share +0.015..+0.034 (docs/results/cascade/item_stats.md); False in the PFD tables
    # --- distillation (PFD Eq. 5, Algorithm 1) ---
    teacher: str = "pfd_md"  # one of TEACHERS ("baseline" = none); pfd_md is the default: it beats the baseline on medium's validation day, within noise of md/sd (docs/results/coarse)
    manner: str = "share_sync"  # one of MANNERS (PFD Table 7); the paper's main runs share common input components
    lam: float = 0.5  # λ of Eq. 5: student loss = (1-λ) L_s + λ L_d (paper: 0.5)
    swap_step: int = 100  # λ = 0 before this step (the teacher's soft labels are noise early); ~20% of one `small` epoch (paper: 1e6 of ~1e6+ steps)
    teacher_hidden: tuple[int, ...] = (512, 256, 128)  # MD / PFD+MD / LUPI teacher DNN widths (paper: 3 layers 512-256-128)
    train_fraction: float = 1.0  # share of training sessions used (seeded); the sample-efficiency curve sets it below 1
    # --- data / evaluation ---
    split: str = "test"  # "test": fit days 1..D-1, evaluate day D; "valid": fit 1..D-2, evaluate D-1 (LR sweeps)
    eval_max_rows: int = 50_000  # evaluate on at most this many impressions of the evaluation day (seeded sample); 0 = all of it
    eval_batch_size: int = 2048  # rows per forward pass at evaluation
    # N > 0: the training days are streamed from their Parquet shards, N rows per chunk per
    # rank (recstack.data.shards.ShardStream, sessions kept together), each rank reading only its slice
    stream_chunk_rows: int = 0  # 0: loaded in memory (DDP splits each global batch across ranks)

    @property
    def n_item_dense(self) -> int:
        """Columns of `item_dense`: the price, then the item statistics when read."""
        return 1 + (len(ITEM_STATS_FIELDS) if self.item_stats else 0)

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "gmv" and self.teacher == "oracle":
            raise ConfigError("teacher 'oracle' (true pCTR soft labels) is a reference of the click-only tables: "
                              "use it with objective=ctr")
        if self.fine_distill < 0:
            raise ConfigError(f"fine_distill must be >= 0, got {self.fine_distill}")
        if self.fine_distill > 0 and (self.objective != "gmv" or not self.fine_targets):
            raise ConfigError("fine_distill > 0 distils into the gmv objective's served score and reads fine_targets: "
                              f"set objective=gmv and fine_targets (got objective={self.objective!r}, "
                              f"fine_targets={self.fine_targets!r})")
        for name in ("fine_distill_requests", "fine_distill_pairs", "fine_distill_top"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if any(w <= 0 for w in self.cvr_hidden):
            raise ConfigError(f"cvr_hidden widths must be positive, got {self.cvr_hidden}")
        if self.teacher not in TEACHERS:
            raise ConfigError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.manner not in MANNERS:
            raise ConfigError(f"manner must be one of {MANNERS}, got {self.manner!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"lam must be in [0, 1], got {self.lam}")
        if self.swap_step < 0:
            raise ConfigError(f"swap_step must be >= 0, got {self.swap_step}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if any(w <= 0 for w in self.teacher_hidden):
            raise ConfigError(f"teacher_hidden widths must be positive, got {self.teacher_hidden}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.eval_max_rows < 0:
            raise ConfigError(f"eval_max_rows must be >= 0 (0: the whole evaluation day), got {self.eval_max_rows}")
        for name in ("embed_dim", "d_model", "n_heads", "ff_dim", "out_dim", "batch_size", "epochs",
                     "eval_batch_size", "length_buckets"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (BatchNorm needs two rows to normalise over)")
        if any(w <= 0 for w in self.hidden):
            raise ConfigError(f"hidden widths must be positive, got {self.hidden}")
        if self.lr <= 0 or self.scale <= 0:
            raise ConfigError("lr and scale must be positive")
        if self.warmup_steps < 0 or self.max_steps < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_steps, max_steps and weight_decay must be >= 0")
        if self.stream_chunk_rows < 0:
            raise ConfigError(f"stream_chunk_rows must be >= 0 (0: in memory), got {self.stream_chunk_rows}")
        if self.stream_chunk_rows and self.train_fraction < 1.0:
            raise ConfigError("train_fraction < 1 samples sessions of the in-memory training days; it is not available "
                              "with stream_chunk_rows > 0")


# what a checkpoint that does not name a field was trained with: the fields added since, at
# the value that reproduces the older models (a default may change; an old model may not)
_BEFORE_FIELDS = {"item_stats": False}


def checkpoint_config(d: dict) -> Config:
    """A checkpoint's config dict -> Config; a checkpoint from before the item statistics option
    rebuilds the model it holds (an item tower on the price alone), whatever the default is today."""
    return from_dict(Config, {**_BEFORE_FIELDS, **d})
