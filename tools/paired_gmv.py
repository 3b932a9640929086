"""Paired GMV@50 share of several bundles of one world, on the same sampled users.

Each bundle ranks the same requests through the serving code at the same sizes
(`recstack.evaluation.cascade`: the oracle, the requests and the per-request measures); the
differences are taken per user against the first bundle, so the pairs are far tighter than
the per-bundle intervals. The bundles are loaded together and take turns request by request,
so their CPU times per request are comparable.

    python tools/paired_gmv.py --data D --out OUT.json [--users 300] [--sizes 1000,200] [--day N] \
        --bundle base=ART_A --bundle stats=ART_B [--bundle ...] [--option stats:browse_coarse_share=0.9] \
        [--arm-sizes stats=1000,100]

An `--option NAME:KEY=VALUE` sets a `Cascade.load` option (e.g. browse_coarse_share, browse_share,
i2i_share) for arm NAME only; one bundle may appear under several names with different options.
An `--arm-sizes NAME=R,C` gives arm NAME its own retrieval and coarse sizes (C = R: the fine
ranker over every retrieved candidate, DESIGN's single stage). Against the first arm each arm
also gets the ratio of the mean shares with a paired bootstrap interval (users resampled).
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

KEPT = ("recall_retrieval", "recall_coarse", "recall_served")


def mean_ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal 95 % interval."""
    return float(x.mean()), float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def ratio_ci(x: np.ndarray, base: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(x) / mean(base) over paired users and its 95 % percentile interval (users resampled)."""
    idx = np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))
    boot = x[idx].mean(axis=1) / base[idx].mean(axis=1)
    return float(x.mean() / base.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def compare(data_dir: str, bundles: dict[str, str], n_users: int, retrieval: int, coarse: int, seed: int = 0,
            day: int | None = None, options: dict[str, dict] | None = None,
            sizes: dict[str, tuple[int, int]] | None = None) -> dict:
    data, truth = load(data_dir), Truth.load(data_dir)
    day = data.test_day if day is None else int(day)
    oracle = C._Oracle(truth, C.requests(data, day, n_users, seed), day, 50)
    sizes = sizes or {}
    loaded: dict[tuple, Cascade] = {}  # arms of one bundle and one set of options share one load
    cascades = {}
    for name, path in bundles.items():
        opts = (options or {}).get(name, {})
        key = (str(Path(path).resolve()), tuple(sorted(opts.items())))
        if key not in loaded:
            loaded[key] = Cascade.load(path, **opts)
        cascades[name] = loaded[key]
    lists: dict[str, dict[str, list[float]]] = {name: {m: [] for m in C.METRICS} for name in bundles}
    names = list(bundles)
    for n in range(len(oracle.users)):
        # the arms take turns request by request, in a rotating order, so that their CPU times
        # see the same process state (caches, allocator, machine load) rather than one another's
        for name in names[n % len(names):] + names[: n % len(names)]:
            C._measure_one(cascades[name], oracle, n, *sizes.get(name, (retrieval, coarse)), lists[name])
    rows = {name: {k: np.asarray(v) for k, v in r.items()} for name, r in lists.items()}
    for name in names:
        m, h = mean_ci(rows[name]["gmv_share"])
        print(f"{name}: GMV@50 share {m:.4f} ± {h:.4f}", flush=True)
    first = next(iter(bundles))
    out = {"data_dir": str(Path(data_dir).resolve()), "day": day, "n_users": int(len(oracle.users)), "seed": seed,
           "retrieval_size": retrieval, "coarse_size": coarse, "bundles": {}, "paired_vs": first, "paired": {}}
    for name, r in rows.items():
        m, h = mean_ci(r["gmv_share"])
        out["bundles"][name] = {"path": str(Path(bundles[name]).resolve()), "options": (options or {}).get(name, {}),
                                "sizes": list(sizes.get(name, (retrieval, coarse))), "gmv_share": m, "gmv_share_ci95": h,
                                **{k: float(r[k].mean()) for k in KEPT}, "cpu_ms_median": float(np.median(r["cpu_ms"])),
                                # the mean is what bounds a server's throughput (requests per CPU second)
                                "cpu_ms_mean": float(r["cpu_ms"].mean()), "ms_mean": float(r["ms"].mean())}
        if name != first:
            d, dh = mean_ci(r["gmv_share"] - rows[first]["gmv_share"])
            q, lo, hi = ratio_ci(r["gmv_share"], rows[first]["gmv_share"])
            out["paired"][name] = {"gmv_share_diff": d, "ci95": dh, "ratio": q, "ratio_ci95": [lo, hi]}
            print(f"{name} - {first}: {d:+.4f} ± {dh:.4f}; ratio {q:.3f} [{lo:.3f}, {hi:.3f}]", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, help="the results JSON")
    ap.add_argument("--bundle", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--option", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="a Cascade.load option for one arm (a float, or true / false)")
    ap.add_argument("--arm-sizes", action="append", default=[], metavar="NAME=R,C",
                    help="retrieval and coarse sizes for one arm (default: --sizes)")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--sizes", default="1000,200", help="retrieval,coarse")
    ap.add_argument("--seed", type=int, default=0, help="the user sample's seed")
    ap.add_argument("--day", type=int, default=None, help="the requests' day (default: the test day)")
    args = ap.parse_args(argv)
    bundles = dict(b.split("=", 1) for b in args.bundle)
    options: dict[str, dict] = {}
    for o in args.option:
        name, _, kv = o.partition(":")
        key, _, value = kv.partition("=")
        if name not in bundles or not key or not value:
            ap.error(f"--option {o!r}: expected NAME:KEY=VALUE with NAME one of {sorted(bundles)}")
        options.setdefault(name, {})[key] = {"true": True, "false": False}.get(value.lower()) \
            if value.lower() in ("true", "false") else float(value)
    sizes: dict[str, tuple[int, int]] = {}
    for a in args.arm_sizes:
        name, _, rc = a.partition("=")
        parts = rc.split(",")
        if name not in bundles or len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
            ap.error(f"--arm-sizes {a!r}: expected NAME=R,C with NAME one of {sorted(bundles)}")
        sizes[name] = (int(parts[0]), int(parts[1]))
    r, c = (int(x) for x in args.sizes.split(","))
    res = compare(args.data, bundles, args.users, r, c, args.seed, args.day, options, sizes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
