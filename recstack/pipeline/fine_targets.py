"""The fine ranker's order over retrieved candidates, for the coarse student to learn (`coarse_rank`
`fine_distill`): the coarse cut should keep what the fine stage would rank high.

    python -m recstack.pipeline.fine_targets --data D --bundle ART --split valid --out TARGETS.npz

For every user active on a training day of the split (their first request that day, on the
features they had then: `recstack.evaluation.cascade.requests`), the bundle's serving code
retrieves R candidates (every source, the browse source included) and its fine ranker scores
all of them with the interacted features of the full log and the item statistics of that day:
log(pCTR x pCVR x value), what the served list is ordered by. The file holds, per request, the
student's user-side inputs, the R candidates and those scores; the coarse trainer samples pairs
from it (`coarse_rank.fine_distill`). Nothing of the evaluation day is read.

The bundle should hold a fine ranker trained on the same split (its scores on its own training
days are what it learned; a ranker that saw the evaluation day leaks it into the coarse stage).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from recstack.browse import browsed_categories
from recstack.data import SimData, load
from recstack.evaluation.cascade import requests
from recstack.serving.cascade import Cascade

from coarse_rank.fine_distill import ARRAYS  # the file's arrays, one row per request, as the trainer reads them


def _one(cascade: Cascade, req: dict, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Request n of `req` -> (its retrieved candidates (R,) int64, their fine log scores (R,) float64)."""
    user, ts = int(req["user_id"][n]), float(req["ts"][n])
    uf, si, se = req["user_feats"][n : n + 1], req["seq_items"][n : n + 1], req["seq_extras"][n : n + 1]
    emb = np.ascontiguousarray(cascade.retrieval_tower({"user_feats": uf, "seq_items": si, "seq_extras": se}), np.float32)
    browsed = None
    if cascade.browse_share > 0:
        item, when, kind = req["log"][n]
        browsed = browsed_categories(item, when, kind, ts, cascade.categories.item_category, cascade.browse_window_s)
    cands, _ = cascade.retrieve(emb, cascade.recent_items(si), size, browsed=browsed)

    def interacted(c: np.ndarray) -> np.ndarray:
        return req["events"].features(np.full(len(c), user), np.full(len(c), ts), c)

    *_, score = cascade.fine_scores(uf, si, se, cands, lambda stage: None, interacted)
    return cands, np.log(np.maximum(score, 1e-30))


def build(data_dir: str | Path | SimData, bundle: str | Path, out: str | Path, split: str = "valid",
          retrieval_size: int = 1000, max_requests: int = 0, seed: int = 0, progress: bool = True,
          days: list[int] | None = None) -> dict:
    """Write the targets file `out` (.npz) and return its summary. `max_requests` > 0: a seeded
    sample of that many requests per training day (0: every active user's first request).
    `days`: these days' requests instead of the split's training days (a live day's log world,
    ranked by the bundle that served it). `data_dir` may be the world already loaded."""
    data = data_dir if isinstance(data_dir, SimData) else load(data_dir)
    fit_days = [int(d) for d in days] if days is not None else data.split_days(split)[0]
    cascade = Cascade.load(bundle)
    size = min(int(retrieval_size), cascade.n_items)
    rows: dict[str, list] = {k: [] for k in ARRAYS}
    t0, skipped = time.perf_counter(), 0
    for day in fit_days:
        req = requests(data, day, max_requests or data.users.n, seed)
        if cascade.item_stats is not None:  # the statistics the fine ranker was trained with on that day
            cascade.item_stats = data.item_stats.table(day)
        for n in range(len(req["user_id"])):
            cands, log_score = _one(cascade, req, n, size)
            if len(cands) < size:  # a degraded or short list: the rows keep one width
                skipped += 1
                continue
            for k, v in (("day", day), ("user_id", req["user_id"][n]), ("ts", req["ts"][n]),
                         ("user_feats", req["user_feats"][n]), ("seq_items", req["seq_items"][n]),
                         ("seq_extras", req["seq_extras"][n]), ("cands", cands.astype(np.int32)),
                         ("log_score", log_score.astype(np.float32))):
                rows[k].append(v)
        if progress:
            print(f"fine targets: day {day}, {len(rows['day'])} requests so far, {time.perf_counter() - t0:.0f} s", flush=True)
    if not rows["day"]:
        raise ValueError(f"no request of days {fit_days} retrieved {size} candidates: nothing to write")
    meta = {"data_dir": str(Path(data.root).resolve()), "bundle": cascade.version, "split": split if days is None else None,
            "fit_days": [int(d) for d in fit_days], "retrieval_size": size, "n_items": int(cascade.n_items),
            "requests": len(rows["day"]), "skipped": skipped, "seconds": round(time.perf_counter() - t0, 1)}
    arrays = {k: np.asarray(v) for k, v in rows.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), **arrays)
    tmp.replace(out)  # a reader never sees half a file
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--bundle", required=True, help="an artifacts root (its current version) or a version folder")
    p.add_argument("--out", required=True, help="the targets file (.npz)")
    p.add_argument("--split", default="valid", choices=("valid", "test"), help="whose training days (default: valid)")
    p.add_argument("--retrieval-size", type=int, default=1000)
    p.add_argument("--max-requests", type=int, default=0, help="per day (0: every active user's first request)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    meta = build(a.data, a.bundle, a.out, a.split, a.retrieval_size, a.max_requests, a.seed)
    print(f"fine targets: wrote {a.out}: {meta['requests']} requests x {meta['retrieval_size']} candidates "
          f"(days {meta['fit_days']}, {meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
