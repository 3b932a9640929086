"""A bundle's fine heads against the world's truth, by fine rank within the coarse cut.

    python tools/cascade_calibration.py --bundle ARTIFACTS/day00 --data WORLD --day 5 [--users 400] [--out C.json]

For the first `--users` users (by id) with impressions on `--day`, the bundle's serving code
(`Cascade.rank`, in process, the snapshot's history aged at the snapshot's time) returns its whole
coarse cut in fine order; on each block of fine ranks it sums the predicted and the true pCTR
(`recstack.world.truth`) and the pCVR weighted by the true pCTR, as the replay's
`calibration_vs_truth` does. A ratio that is the same on every block says the heads are off on the
cascade's candidates as a whole; one that rises towards the top says the fine ranker selects its
own over-estimates (a winner's curse).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from recstack.data import load
from recstack.pipeline.replay import calibration_vs_truth
from recstack.serving.cascade import Cascade, Query
from recstack.world.truth import Truth

BLOCKS = ((0, 10), (10, 50), (50, 200))


def by_rank(cascade: Cascade, data_dir: str | Path, day: int, users: int, retrieval: int = 1000,
            coarse: int = 200) -> dict:
    """{"1-10": {"ctr", "cvr", "items"}, ...} over the sampled users' coarse cuts."""
    data, truth = load(data_dir), Truth.load(data_dir)
    sample = np.unique(data.impressions(day)["user_id"])[:users]
    retrieval = min(retrieval, cascade.n_items)
    coarse = min(coarse, retrieval)
    sums = {b: np.zeros(5) for b in BLOCKS}  # pCTR-hat, pCTR, pCTR * pCVR-hat, pCTR * pCVR, items
    for u in sample.tolist():
        r = cascade.rank(Query(user_id=int(u), num_results=coarse, retrieval_size=retrieval, coarse_size=coarse,
                               now=cascade.snapshot.time), None)
        items = r.item_ids[None]
        p, q = truth.pctr([u], items, day)[0], truth.pcvr([u], items, day)[0]
        for a, b in BLOCKS:
            s = slice(a, b)
            sums[(a, b)] += (r.pctr[s].sum(), p[s].sum(), (p[s] * r.pcvr[s]).sum(), (p[s] * q[s]).sum(), len(p[s]))
    return {f"{a + 1}-{b}": {**calibration_vs_truth(*v[:4]), "items": int(v[4])} for (a, b), v in sums.items() if v[4]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="a bundle directory or an artifacts root")
    ap.add_argument("--data", required=True, help="the simulated world (its truth scores the items)")
    ap.add_argument("--day", type=int, required=True, help="the day whose users and truth are used")
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    res = {"bundle": str(a.bundle), "data": str(a.data), "day": a.day, "users": a.users,
           "by_fine_rank": by_rank(Cascade.load(a.bundle), a.data, a.day, a.users)}
    for block, v in res["by_fine_rank"].items():
        print(f"fine ranks {block:>7}: pCTR predicted / true {v['ctr']:.3f}   pCVR (click-weighted) {v['cvr']:.3f}"
              f"   ({v['items']} items)")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
