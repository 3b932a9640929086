"""The CVR baseline's test-day calibration with its shift fitted on the training rows
(`calibration_holdout=0`, the default) against a slice held out of fitting (`0.1`), paired seeds.

    python tools/calibration_holdout.py DATA OUT [--seeds 1,2,3,4,5] [--lr 0.004] [--holdout 0.1]

DATA: a simulated world (the experiments' test split: its training days -> its test day). OUT gets
results.json and table.md: per seed, the test-day AUC, mean prediction / mean label and mean
prediction / mean true pCVR (free of label noise), and the paired AUC difference with its 95 % CI.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from fine_rank import train as T
from fine_rank.experiments.runs import load_tables
from recstack.config import apply_overrides
from recstack.evaluation.protocol import paired_diff
from recstack.evaluation import metrics as M

BASE = ["cvr_teacher=none", "ctr_sead=none", "cvr_sead=none", "item_stats=false"]  # the CVR tables' baseline


def fit_one(tables, seed: int, lr: float, holdout: float) -> dict:
    cfg = apply_overrides(T.Config(), [*BASE, f"cvr_lr={lr}", f"calibration_holdout={holdout}"])
    res = T.fit_task("cvr", cfg, tables.vocab, tables.test.fit["cvr"], seed)
    test = tables.test.score["cvr"]
    p = T.predict(res.model, test, cfg.eval_batch_size).astype(np.float64)
    return {"auc": float(M.auc(test["purchase"], p)), "calibration": float(p.mean() / test["purchase"].mean()),
            "calibration_vs_truth": float(p.mean() / test["true_pcvr"].mean()),
            "calibration_rows": res.stats["calibration_rows"], "n_train": res.stats["n_train"]}


def summary(rows: dict, seeds: list[int], holdout: float) -> dict:
    col = lambda h, k: np.array([rows[str(s)][str(h)][k] for s in seeds])  # noqa: E731
    d = paired_diff(col(holdout, "auc"), col(0.0, "auc"))
    out = {"auc_diff": d["mean"], "auc_diff_ci": d["ci95"]}
    for h in (0.0, holdout):
        for k in ("auc", "calibration", "calibration_vs_truth"):
            v = col(h, k)
            out[f"{k}@{h}"] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data"), ap.add_argument("out")
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--lr", type=float, default=0.004)
    ap.add_argument("--holdout", type=float, default=0.1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    tables = load_tables(a.data)
    rows = {str(s): {str(h): fit_one(tables, s, a.lr, h) for h in (0.0, a.holdout)} for s in seeds}
    res = {"data": str(a.data), "world": tables.world, "seeds": seeds, "lr": a.lr, "holdout": a.holdout,
           "per_seed": rows, "summary": summary(rows, seeds, a.holdout)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    s = res["summary"]
    lines = ["| seed | AUC, shift on training rows | AUC, shift on held-out slice | mean pred / label | "
             "mean pred / label, held out | mean pred / true pCVR | mean pred / true pCVR, held out |", "|---" * 7 + "|"]
    for sd in seeds:
        r0, r1 = rows[str(sd)]["0.0"], rows[str(sd)][str(a.holdout)]
        lines.append(f"| {sd} | {r0['auc']:.4f} | {r1['auc']:.4f} | {r0['calibration']:.3f} | {r1['calibration']:.3f} | "
                     f"{r0['calibration_vs_truth']:.3f} | {r1['calibration_vs_truth']:.3f} |")
    lo, hi = s["auc_diff_ci"]
    lines.append(f"\nPaired AUC difference (held out - training rows): {s['auc_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
