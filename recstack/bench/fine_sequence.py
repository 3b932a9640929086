"""The served fine stage's cost on one request, bundle against bundle (`python -m
recstack.bench.fine_sequence`): the ONNX graph each bundle serves, fed a real user's features
and M candidates exactly as the cascade feeds them, timed round-robin in one process so the
shared machine's load hits every path alike. Each call is timed in wall ms and in the calling
thread's CPU ms (the graph runs single-threaded on that thread): on a loaded machine the wall
time is mostly waiting for a core, the CPU time is the graph's cost.

    python -m recstack.bench.fine_sequence --bundle none=ART_A --bundle din=ART_B --candidates 500

For a graph that reads the behaviour sequence, it also times the same graph fed the sequence
repeated per candidate ((M, L, ...), as a per-row trainer would feed it): what computing the
sequence side once per request saves.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from recstack import features as F
from recstack.serving.cascade import _FINE_INPUTS, Cascade, Query
from recstack.serving.fine import FineScorer


def request_feeds(cascade: Cascade, user: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The fine feeds of one request of `user` at the bundle's snapshot time: n random candidates."""
    q = Query(user_id=user, num_results=n, retrieval_size=n, coarse_size=n, now=cascade.snapshot.time)
    seq_items, seq_extras, _ = cascade.sequence(q)
    cands = np.random.default_rng(seed).choice(cascade.n_items, n, replace=False).astype(np.int64)
    counts = cascade.interacted_for(q)(cands)
    return F.fine_inputs(cascade.users.feats(np.array([user])), seq_items, seq_extras, cascade.items, cands, counts,
                         cascade.item_stats)


def paths(bundles: dict[str, str], n: int, precision: str, user: int) -> dict:
    """name -> a no-argument call of that bundle's fine graph on one request (and, for a graph
    that reads the sequence, name + "/sequence_per_row")."""
    out = {}
    for name, path in bundles.items():
        cascade = Cascade.load(path, warm=False)
        scorer = FineScorer.load(cascade.bundle, _FINE_INPUTS, 1, precision=precision)
        feeds = request_feeds(cascade, user, n)
        out[name] = (lambda s=scorer, f=feeds: s(f))
        if "seq_items" in scorer.models[0].inputs:
            rows = dict(feeds, seq_items=np.repeat(feeds["seq_items"], n, axis=0),
                        seq_extras=np.repeat(feeds["seq_extras"], n, axis=0))
            out[f"{name}/sequence_per_row"] = (lambda s=scorer, f=rows: s(f))
    return out


def time_both(fns: dict, repeats: int, warmup: int = 5) -> dict[str, dict[str, dict[str, float]]]:
    """Round-robin over the paths, `repeats` rounds -> name -> {"wall_ms", "cpu_ms"} -> median, p10, p90."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    xs = {k: ([], []) for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            xs[k][0].append((time.perf_counter() - w0) * 1e3)
            xs[k][1].append((time.thread_time() - c0) * 1e3)

    def stats(v) -> dict[str, float]:
        return {"median": round(float(np.median(v)), 3), "p10": round(float(np.percentile(v, 10)), 3),
                "p90": round(float(np.percentile(v, 90)), 3)}

    return {k: {"wall_ms": stats(w), "cpu_ms": stats(c)} for k, (w, c) in xs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", required=True, help="NAME=PATH (a bundle or artifacts root), repeatable")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    ap.add_argument("--user", type=int, default=0)
    a = ap.parse_args(argv)
    bundles = dict(b.split("=", 1) for b in a.bundle)
    t = time_both(paths(bundles, a.candidates, a.precision, a.user), a.repeats)
    print(json.dumps({"candidates": a.candidates, "precision": a.precision, "repeats": a.repeats, "ms": t}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
