"""The CVR table's rows retrained at one fixed learning rate, per seed, paired to the baseline.

Each row retrains on the test phase (days 1..D-1, scored on day D) for every seed, as in
`recstack experiment cvr`, but at the LR given here rather than the one the validation day
chose: a check of the table's contrasts against the LR choice. Writes per-seed AUCs, the CPU
seconds per fit and paired differences to the baseline as JSON.

    python tools/cvr_fixed_lr.py DATA OUT.json --lr 0.002 [--rows baseline,pfd,...] [--seeds 1,...,10]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from recstack.evaluation import metrics as M
from recstack.evaluation import protocol as X

from fine_rank import train as T
from fine_rank.experiments import base_config
from fine_rank.experiments.plan import CVR_METHODS, FinePlan
from fine_rank.experiments.runs import load_tables, run_many


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data"), ap.add_argument("out")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--rows", default="baseline,sd,lupi,pfd,sd_lam0,oracle_teacher,oracle_teacher_lam1")
    ap.add_argument("--seeds", default="1,2,3,4,5,6,7,8,9,10")
    a = ap.parse_args()
    methods = {m.name: m for m in CVR_METHODS}
    rows = a.rows.split(",")
    unknown = [r for r in rows if r not in methods]
    if unknown or "baseline" not in rows:
        raise SystemExit(f"--rows: need baseline and names from {sorted(methods)}, got unknown {unknown}")
    seeds = [int(s) for s in a.seeds.split(",")]
    torch.set_num_threads(1)
    tables = load_tables(a.data)
    base = base_config(FinePlan.from_cli("cvr", seeds, config=T.Config))
    label = tables.test.score["cvr"]["purchase"]
    auc, cpu = {}, {}
    for name in rows:
        t = time.process_time()
        outs = run_many(tables, [(methods[name], base, "test", a.lr, s, 1.0, ()) for s in seeds], 1)
        cpu[name] = (time.process_time() - t) / len(seeds)
        auc[name] = [M.auc(label, o["probs"]) for o in outs]
        print(f"{name} @ lr {a.lr}: AUC {np.mean(auc[name]):.4f} ({cpu[name]:.1f} cpu-s / fit)", flush=True)
    out = {"data": a.data, "lr": a.lr, "seeds": seeds, "cpu_s_per_fit": cpu,
           "rows": {n: {"student_auc_per_seed": auc[n], "student_auc": X.mean_std(auc[n]),
                        "delta_vs_baseline": X.paired_diff(auc[n], auc["baseline"])} for n in rows}}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
