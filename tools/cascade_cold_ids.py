"""Does the coarse stage lose the oracle's items to cold items' untrained id embeddings?

The coarse item vectors are recomputed twice from the trained student: as exported, and with the
id-embedding rows of the items that have no impression in the fit days set to zero (the padding
row's value, what an unknown item gets); each set is served in float32 by the bundle's cascade
and scored against the simulator's truth at a few stage sizes, on the same users.

    python tools/cascade_cold_ids.py --runs RUNS --data WORLD --artifacts ARTIFACTS --out OUT [--fit-days 1,2]

Writes OUT/cold_ids.json (per variant: retrieval, coarse, oracle@50 kept after retrieval and after
coarse, GMV@50 share) and each variant's cascade results under OUT/<variant>/.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import torch

from coarse_rank.export import served_item_vectors
from coarse_rank.inputs import load_student
from recstack.data import load
from recstack.evaluation import cascade as ce
from recstack.serving.cascade import Cascade
from recstack.serving.coarse import CoarseVectors


def served_vectors(model, cfg, data) -> np.ndarray:
    return served_item_vectors(model, cfg, data)[0]  # as the exporter writes them


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--artifacts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fit-days", default="1,2")
    p.add_argument("--users", type=int, default=100)
    a = p.parse_args()
    torch.set_num_threads(1)
    model, cfg, _ = load_student(Path(a.runs) / "coarse" / "checkpoint.pt")
    data = load(a.data)
    table = ds.dataset(Path(a.data) / "impressions", format="parquet", partitioning="hive").to_table(columns=["item_id", "day"])
    fit = np.isin(np.asarray(table.column("day").to_numpy(), np.int64), [int(d) for d in a.fit_days.split(",")])
    seen = np.bincount(table.column("item_id").to_numpy()[fit], minlength=data.items.n)
    cold = np.flatnonzero(seen == 0)
    variants = {"fp32": served_vectors(model, cfg, data)}
    with torch.no_grad():
        model.item_tower.embeddings.item_tables[0].weight[torch.from_numpy(cold + 1)] = 0.0  # model ids are raw + 1
    variants["fp32_cold_id_zeroed"] = served_vectors(model, cfg, data)
    cascade = Cascade.load(a.artifacts)
    settings = ce.Settings(n_users=a.users, retrieval_sizes=(3000, 10000), coarse_sizes=(500, 1000), default_retrieval=10000,
                           default_coarse=500, exhaustive=False, full_grid=True, i2i_shares=(0.3,), plot=False)
    out = {"cold_items": int(len(cold)), "n_items": int(data.items.n), "fit_days": a.fit_days}
    for name, vecs in variants.items():
        cascade.coarse_vectors = CoarseVectors(vecs)
        res = ce.run(a.artifacts, a.data, Path(a.out) / name, settings, cascade=cascade)
        out[name] = [{k: c[k] for k in ("retrieval_size", "coarse_size", "recall_retrieval", "recall_coarse", "gmv_share") if k in c}
                     for c in res["configs"]]
        print(name, json.dumps(out[name]), flush=True)
    (Path(a.out) / "cold_ids.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
