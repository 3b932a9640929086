"""How much of what retrieval found a coarse cut of C could keep: the served coarse student against
the bundle's own fine ranker over every retrieved candidate, on the same requests.

For each sampled user's first request of the day (`recstack.evaluation.cascade`: the oracle's
top 50 by true expected GMV), the serving code retrieves R candidates; the share of the oracle's
top 50 among them is `retrieval`. Of those, the coarse student's cut keeps `coarse`; the fine
ranker, scoring all R (what the cascade would do with no coarse stage), keeps `fine_of_all` in
its top C. `fine_of_all / retrieval` is what a coarse stage that ordered candidates as the fine
ranker does would keep: the reference for the coarse student's keep.

    python tools/coarse_bound.py --data D --bundle ART [--users 300] [--sizes 1000,200] [--day N] [--out OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recstack.data import load  # noqa: E402
from recstack.evaluation import cascade as C  # noqa: E402
from recstack.serving.cascade import Cascade  # noqa: E402
from recstack.world.truth import Truth  # noqa: E402


def mean_ci(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()), float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def measure(data_dir: str, bundle: str, n_users: int, retrieval: int, coarse: int, seed: int = 0,
            day: int | None = None) -> dict:
    data, truth = load(data_dir), Truth.load(data_dir)
    day = data.test_day if day is None else int(day)
    oracle = C._Oracle(truth, C.requests(data, day, n_users, seed), day, 50)
    cascade = Cascade.load(bundle)
    rows: dict[str, list[float]] = {"retrieval": [], "coarse": [], "fine_of_all": []}
    for n in range(len(oracle.users)):
        o = oracle.ids[n]
        trace: dict = {}
        oracle.rank(cascade, n, retrieval, coarse, trace)
        rows["retrieval"].append(C._hits(trace["retrieved"], o))
        rows["coarse"].append(C._hits(trace["coarse"], o))
        # no coarse cut: the fine ranker orders every retrieved candidate; its top `coarse`
        oracle.k = coarse
        try:
            every = oracle.rank(cascade, n, retrieval, retrieval)
        finally:
            oracle.k = 50
        rows["fine_of_all"].append(C._hits(np.asarray(every.item_ids)[:coarse], o))
    out = {"data_dir": str(Path(data_dir).resolve()), "bundle": str(Path(bundle).resolve()), "day": day,
           "n_users": int(len(oracle.users)), "seed": seed, "retrieval_size": retrieval, "coarse_size": coarse}
    for k, v in rows.items():
        out[k], out[f"{k}_ci95"] = mean_ci(v)
    out["coarse_keep"] = out["coarse"] / out["retrieval"]
    out["fine_of_all_keep"] = out["fine_of_all"] / out["retrieval"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--bundle", required=True, help="an artifacts root (its current version) or a version folder")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--sizes", default="1000,200", help="retrieval,coarse")
    p.add_argument("--day", type=int, default=None, help="default: the test day")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    r, c = (int(x) for x in a.sizes.split(","))
    res = measure(a.data, a.bundle, a.users, r, c, a.seed, a.day)
    print(f"oracle top 50 kept: retrieval {res['retrieval']:.4f}; coarse cut {res['coarse']:.4f} "
          f"(keep {res['coarse_keep']:.3f}); fine over all {r}, top {c}: {res['fine_of_all']:.4f} "
          f"(keep {res['fine_of_all_keep']:.3f})")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
