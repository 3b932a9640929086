"""The fine ranker's order over retrieved candidates, distilled into the coarse student's served score.

The coarse cut keeps the top C of the R retrieved candidates; the cascade serves what the fine
ranker then ranks high. Trained on impressions alone, the student never sees the candidates it
cuts at serving. With `Config.fine_distill` = mu > 0 each step adds

    mu * mean over pairs (i in the fine ranker's top C, j not) of softplus(s_j - s_i)

over a few requests of a targets file (`recstack.pipeline.fine_targets`: per training-day
request, the served retrieval's R candidates and the fine ranker's log(pCTR x pCVR x value)),
s being the served coarse score, click logit + log pCVR_i + log value_i (`coarse_rank.objective`).
The impression losses (and PFD's teacher) are unchanged; only the pairs are new. The fine ranker
is a privileged teacher of the cut: it sees the interacted features over the full log and the
candidates the student will face, at no serving cost (it is not exported).

    targets = FineTargets.load(path, data, top)   # refused whole, with one line, when it does not fit
    loss = targets.pair_loss(student, cfg, step)  # seeded by (cfg.seed, step): a resumed run samples alike
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recstack.config import ConfigError

# the arrays of a targets file (recstack.pipeline.fine_targets writes them), one row per request
ARRAYS = ("day", "user_id", "ts", "user_feats", "seq_items", "seq_extras", "cands", "log_score")


class FineTargets:
    """A targets file checked against the data it trains on."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict, data, top: int, item_stats: bool = True):
        self.a, self.meta, self.data = arrays, meta, data
        n, r = arrays["cands"].shape
        self.n, self.r = n, r
        self.top = min(int(top), r - 1)
        order = np.argsort(-arrays["log_score"], axis=1, kind="stable")
        self.in_top = np.zeros((n, r), bool)
        np.put_along_axis(self.in_top, order[:, : self.top], True, axis=1)
        # the item statistics of each request's day, as the impressions of that day read them (None: price only)
        days = np.unique(arrays["day"])
        self.tables = {int(d): data.item_stats.table(int(d)) if item_stats else None for d in days}
        self.log_price = np.log(np.maximum(data.items.price.astype(np.float64), 1e-12))

    @classmethod
    def load(cls, path: str | Path, data, top: int, fit_days: list[int] | None = None,
             item_stats: bool = True) -> "FineTargets":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"fine_targets: no file at {str(path)!r} (write one with python -m recstack.pipeline.fine_targets)")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ARRAYS}
                meta = json.loads(str(z["meta"]))
        except (KeyError, ValueError, OSError) as e:
            raise ConfigError(f"fine_targets {str(path)!r}: not a targets file ({e})") from e
        why = _problem(arrays, meta, data, fit_days)
        if why:
            raise ConfigError(f"fine_targets {str(path)!r}: {why}")
        return cls(arrays, meta, data, top, item_stats)

    def sample(self, rng: np.random.Generator, n_requests: int, per_side: int) -> tuple[np.ndarray, np.ndarray]:
        """(requests (Q,), candidates (Q, 2P) raw ids: P of the fine ranker's top, then P of the rest)."""
        q = min(n_requests, self.n)
        rows = rng.choice(self.n, q, replace=False)
        p = min(per_side, self.top, self.r - self.top)
        pos = np.stack([rng.choice(np.flatnonzero(self.in_top[i]), p, replace=False) for i in rows])
        neg = np.stack([rng.choice(np.flatnonzero(~self.in_top[i]), p, replace=False) for i in rows])
        return rows, np.take_along_axis(self.a["cands"][rows], np.concatenate([pos, neg], axis=1), axis=1).astype(np.int64)

    def served_scores(self, student, rows: np.ndarray, cands: np.ndarray, length_buckets: int = 1) -> torch.Tensor:
        """The student's served coarse scores (Q, M) of each request's candidates (Q, M)."""
        a, items = self.a, self.data.items
        u = student.user_tower(torch.from_numpy(a["user_feats"][rows]), torch.from_numpy(a["seq_items"][rows]),
                               torch.from_numpy(a["seq_extras"][rows]), length_buckets)  # (Q, D)
        flat = cands.reshape(-1)
        dense = np.concatenate([items.dense(c, self.tables[int(d)]) for c, d in zip(cands, a["day"][rows])])
        feats = torch.from_numpy(items.feats(flat))
        dense = torch.from_numpy(np.ascontiguousarray(dense, np.float32))
        v = student.item_tower(feats, dense).view(*cands.shape, -1)
        term = F.logsigmoid(student.cvr_logit(feats, dense)) + torch.from_numpy(self.log_price[flat]).float()
        return student.scale * (u[:, None, :] * v).sum(-1) + term.view(cands.shape)

    def pair_loss(self, student, cfg, step: int) -> torch.Tensor:
        """The pairwise term of one step (before its weight mu)."""
        rng = np.random.default_rng([int(cfg.seed), int(step), 0xF1E])
        rows, cands = self.sample(rng, cfg.fine_distill_requests, cfg.fine_distill_pairs)
        s = self.served_scores(student, rows, cands, cfg.length_buckets)
        p = cands.shape[1] // 2
        return F.softplus(s[:, p:, None] - s[:, None, :p]).mean()  # every (top, rest) pair of a request


def _problem(a: dict[str, np.ndarray], meta: dict, data, fit_days: list[int] | None) -> str | None:
    """Why the arrays cannot train on `data` (None when they can)."""
    n = len(a["day"])
    if n == 0 or a["cands"].ndim != 2 or a["cands"].shape[1] < 2:
        return f"cands has shape {a['cands'].shape}: needs (requests >= 1, candidates >= 2)"
    for k in ARRAYS:
        if len(a[k]) != n:
            return f"{k} has {len(a[k])} rows, day has {n}"
    if a["log_score"].shape != a["cands"].shape or not np.isfinite(a["log_score"]).all():
        return "log_score must be finite and shaped like cands"
    if a["cands"].min() < 0 or a["cands"].max() >= data.items.n or meta.get("n_items") != data.items.n:
        return f"written for a corpus of {meta.get('n_items')} items, the data has {data.items.n}"
    if fit_days is not None and not set(np.unique(a["day"]).tolist()) <= set(fit_days):
        return f"holds requests of days {sorted(set(np.unique(a['day']).tolist()))}, the training days are {list(fit_days)}"
    if a["seq_items"].ndim != 3 or a["seq_items"].shape[2] != 5 or a["user_feats"].ndim != 2:
        return "user-side arrays have the wrong shapes"
    return None
