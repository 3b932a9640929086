"""Fill the coarse fit cache in order of priority, seed by seed, so that whatever finishes
forms complete paired sets: `recstack experiment coarse` then finds every fit cached.

    python tools/pfd_fill_cache.py DATA CONTROL_DATA CACHE [--seeds 1,...,10] [--lr 0.05] [--workers 2] \
        [--groups bsp,md,oracle,control] [--set KEY=VALUE ...]

The jobs are the test-day fits of `recstack experiment coarse --set lrs=LR` (Share*&Sync, the
same Config and keys), in this order: baseline / SD / PFD for each seed, MD / PFD+MD for each
seed, the oracle, then SD / PFD on the control world (`--groups bsp,md,oracle,control`: which of
these groups, in which order). Fits already cached are skipped. `--set` takes the experiment's
`--set` keys that shape these fits: a Config field changes every fit as it does there (e.g.
lr_schedule=linear); `selected_lrs=baseline:0.025,pfd:0.05` (an LR sweep's choices, as handed
to the test-day run) gives those rows their own LR instead of `--lr`, on both worlds, as the
experiment's control runs at the rates chosen on the main world; `base_days` sets the windows.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import time
from pathlib import Path

from recstack.data import load

from coarse_rank.experiments import base_config
from coarse_rank.experiments.plan import ROWS, CoarsePlan, windows
from coarse_rank.experiments.runner import _fit_job, _job_key
from coarse_rank.train import Config

# name -> (rows, world); `--groups` sets their order (default: the order below)
GROUPS = {"bsp": (("baseline", "sd", "pfd"), "main"), "md": (("md", "pfd_md"), "main"), "oracle": (("oracle",), "main"),
          "control": (("sd", "pfd"), "control")}
PLAN_KEYS = ("selected_lrs", "base_days")  # the experiment's plan keys that change which fits these are


def jobs(data: str, control: str, cache: str, seeds: list[int], lr: float, sets: list[str] = (),
         groups: list[str] = tuple(GROUPS)) -> list[tuple]:
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise SystemExit(f"--groups: unknown group(s) {unknown}; choose from {list(GROUPS)}")
    fields = {f.name for f in dataclasses.fields(Config)}
    other = [s.partition("=")[0] for s in sets if s.partition("=")[0] not in fields and s.partition("=")[0] not in PLAN_KEYS]
    if other:
        raise SystemExit(f"--set: {other} would not change these fits; use a Config field or one of {list(PLAN_KEYS)}")
    plan = CoarsePlan.from_cli("coarse", seeds, workers=1, config=Config, cache=cache, overrides=list(sets))
    base = base_config(plan)
    out = []
    for rows, world in (GROUPS[g] for g in groups):
        d = data if world == "main" else control
        win = windows(load(d), plan.base_days)
        for s in seeds:
            for m in rows:
                cfg = Config(**{**base.__dict__, **ROWS[m], "lr": plan.selected_lrs.get(m, lr), "seed": s})
                cfg.validate()
                out.append((d, cfg, win["train"], win["test"], cache))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data"), ap.add_argument("control"), ap.add_argument("cache")
    ap.add_argument("--seeds", default="1,2,3,4,5,6,7,8,9,10")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"the groups to fill, in this order (of {list(GROUPS)})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a Config field of every fit, or selected_lrs=ROW:LR,... / base_days=N")
    a = ap.parse_args()
    todo = [j for j in jobs(a.data, a.control, a.cache, [int(s) for s in a.seeds.split(",")], a.lr, a.set, a.groups.split(","))
            if not (Path(a.cache) / f"{_job_key(j[0], j[1], j[2], j[3])}.npz").exists()]
    print(f"{len(todo)} fits to run", flush=True)
    with mp.get_context("fork").Pool(a.workers, maxtasksperchild=4) as pool:
        for j, f in zip(todo, pool.imap(_fit_job, todo, chunksize=1)):
            r = f.result
            print(f"{time.strftime('%H:%M:%S')} {Path(j[0]).name} {j[1].teacher} seed {j[1].seed}: student {r['auc']:.4f} "
                  f"({r.get('train_cpu_seconds', float('nan')):.0f} cpu-s)", flush=True)


if __name__ == "__main__":
    main()
