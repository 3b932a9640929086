"""Does the item-to-item source still add GMV once the browse source is on?

Three arms of the served cascade on the same requests, paired by user: i2i share 0.3 for every
request (`browse_replaces_i2i=False`), i2i only for requests without browse triggers (the
default) and no i2i at all; each arm's GMV@50 share against the world's oracle and the offline
loop's CPU ms per request (process time; two passes, interleaved, to show the machine's noise).

    PYTHONPATH=. python tools/browse_replaces_i2i.py BUNDLE DATA {valid,test} N_USERS R:C[,R:C ...] OUT.json
"""
from __future__ import annotations

import json
import sys

import numpy as np

from recstack.data import load
from recstack.evaluation import cascade as C
from recstack.world.truth import Truth

ARMS = (("i2i 0.3 always", 0.3, False), ("i2i only without browse (default)", 0.3, True), ("i2i 0", 0.0, True))


def main(bundle: str, data_dir: str, which: str, n_users: int, sizes: list[tuple[int, int]], out_path: str) -> None:
    data, truth = load(data_dir), Truth.load(data_dir)
    day = data.valid_day if which == "valid" else data.test_day
    cas = C.Cascade.load(bundle)
    oracle = C._Oracle(truth, C.requests(data, day, n_users, 0), day, 50)
    out = {"bundle": bundle, "data": data_dir, "day": int(day), "n_users": n_users, "rows": []}
    for r, c in sizes:
        res: dict[str, list] = {}
        for rep in range(2):
            for name, share, replaces in ARMS:
                cas.i2i_share, cas.browse_replaces_i2i = share, replaces
                rows = C._measure(cas, oracle, r, c)
                g = np.array(rows["gmv_share"])
                if rep == 0:
                    res[name] = [g, []]
                elif not np.allclose(res[name][0], g):
                    raise SystemExit(f"{name}: the second pass ranked differently")
                res[name][1].append(float(np.mean(rows["cpu_ms"])))
        base = res[ARMS[0][0]][0]
        for name, (g, cpu) in res.items():
            d = g - base
            row = {"retrieval": r, "coarse": c, "arm": name, "gmv_share": float(g.mean()), "diff_vs_always": float(d.mean()),
                   "diff_ci95": float(1.96 * d.std(ddof=1) / np.sqrt(len(d))), "cpu_ms": cpu}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), [tuple(map(int, s.split(":"))) for s in a[4].split(",")], a[5])
