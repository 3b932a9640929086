"""Cascade recall against the truth: what share of the best items survives each stage.

    from recstack.evaluation.cascade import Settings, run
    results = run("ARTIFACTS", "DATA_DIR", "OUT_DIR", Settings(n_users=300))

For a sample of users active on the evaluation day (the test day by default) the oracle
ranks the *whole corpus* by the simulator's true expected GMV of one impression,
E[pCTR] x pCVR x price for that day's intent (recstack/world/truth.py), and keeps its top k
(50). The served cascade (the bundle, through `Cascade.rank_features`, i.e. the serving
code) is run for the same user at the time of their first session that day, on the features
they had then (profile + behaviours strictly before that time). Per stage size it reports

- recall of the oracle top-k after retrieval, after coarse and in the served top k
  (|oracle ∩ stage output| / k, averaged over users);
- GMV@k share: the true expected GMV of the served list / the oracle list's (the oracle
  list is the best any list of k can do, so the share is in [0, 1]);
- the same GMV share for two references: the fine ranker scoring the whole corpus (no
  retrieval, no coarse: what the cascade's early stages cost) and the logging policy's
  popularity top k (what the old recommender would show), plus k random items.

Nothing here is a model input: the oracle is used only to score.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from recstack import features as FE
from recstack.data import load
from recstack.browse import browsed_categories
from recstack.serving.cascade import SOURCE_BROWSE, SOURCE_I2I, SOURCES, Cascade, Query
from recstack.world.truth import Truth


def requests(data, day: int, n_users: int, seed: int) -> dict[str, np.ndarray]:
    """First session of up to n_users users active on `day`, with their features at that time.

    -> {"user_id" (N,), "ts" (N,), "user_feats" (N, 4), "seq_items" (N, L, 5), "seq_extras" (N, L, 3),
        "events": the full log's EventIndex (the interacted features, as training counts them),
        "log": per request, the user's events strictly before its time (item, ts, kind), for the browse source}
    """
    imps = data.impressions(day)
    order = np.lexsort((imps["ts"], imps["user_id"]))
    users, first = np.unique(imps["user_id"][order], return_index=True)
    ts = imps["ts"][order][first]
    pick = np.sort(np.random.default_rng(seed).permutation(len(users))[:n_users])
    users, ts = users[pick].astype(np.int64), ts[pick]
    hist = FE.history_features(data.behaviours, users, ts, data.items)  # strictly before ts: nothing from the session itself
    return {"user_id": users, "ts": ts, "user_feats": data.users.feats(users), "seq_items": hist.seq_items,
            "seq_extras": hist.seq_extras, "events": data.event_index, "log": user_logs(data.events, users, ts)}


def user_logs(ev: dict[str, np.ndarray], users: np.ndarray, ts: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Each (user, time): the user's events strictly before that time -> (item, ts, kind) arrays."""
    mine = np.flatnonzero(np.isin(ev["user_id"], users))
    mine = mine[np.argsort(ev["user_id"][mine], kind="stable")]
    u = ev["user_id"][mine]
    out = []
    for user, t in zip(users, ts):
        rows = mine[np.searchsorted(u, user) : np.searchsorted(u, user, side="right")]
        rows = rows[ev["ts"][rows] < t]
        out.append((ev["item_id"][rows], ev["ts"][rows], ev["kind"][rows]))
    return out


def _hits(a: np.ndarray, oracle: np.ndarray) -> float:
    return float(np.isin(oracle, a).sum()) / len(oracle)


@dataclass
class Settings:
    """What `run` evaluates: the users, the stage-size grid and the references."""

    n_users: int = 300  # test-day users sampled (their first session)
    day: int | None = None  # the evaluation day (None: the test day)
    k: int = 50  # size of the served list and of the oracle's
    retrieval_sizes: tuple[int, ...] = (100, 300, 1000, 3000)  # each at default_coarse
    coarse_sizes: tuple[int, ...] = (50, 100, 200, 500)  # each at default_retrieval
    i2i_shares: tuple[float, ...] = (0.0, 0.3)  # every grid point with each share of i2i candidates
    default_retrieval: int = 1000  # the serving default sizes
    default_coarse: int = 200
    exhaustive: bool = True  # also the fine ranker over the whole corpus (a reference)
    seed: int = 0  # the user sample
    plot: bool = True  # cascade_recall.png
    full_grid: bool = False  # every (retrieval, coarse) pair with coarse <= retrieval (the CPU-budget Pareto sweep)
    browse_share: float | None = None  # the browse source's share for the whole run (None: the cascade's own)

    def grid(self, n_items: int) -> list[tuple[int, int]]:
        """(retrieval, coarse) sizes: every retrieval size at default_coarse, every coarse size at
        default_retrieval (coarse <= retrieval), clamped to the corpus, without repeats; with
        `full_grid`, every pair of the two lists with coarse <= retrieval as well."""
        grid = sorted({(r, self.default_coarse) for r in self.retrieval_sizes} |
                      {(self.default_retrieval, c) for c in self.coarse_sizes} |
                      ({(r, c) for r in self.retrieval_sizes for c in self.coarse_sizes if c <= r}
                       if self.full_grid else set()))
        grid = [(min(r, n_items), min(c, r, n_items)) for r, c in grid]
        return list(dict.fromkeys(grid))


METRICS = ("recall_retrieval", "recall_coarse", "recall_served", "gmv_share", "i2i_in_retrieved", "i2i_in_served",
           "oracle_via_i2i", "browse_in_retrieved", "oracle_via_browse", "ms", "cpu_ms")
WITH_SE = ("recall_retrieval", "recall_coarse", "recall_served", "gmv_share")


class _Oracle:
    """The sampled requests, their oracle top k and the GMV share of any list."""

    def __init__(self, truth: Truth, req: dict, day: int, k: int):
        self.truth, self.req, self.day, self.k = truth, req, day, k
        self.users = req["user_id"]
        self.ids, gmv = truth.oracle_top_k(self.users, day, k)  # (N, k)
        self.gmv_sum = gmv.sum(axis=1)  # (N,)

    def gmv_share(self, n: int, items: np.ndarray) -> float:
        if len(items) == 0:
            return 0.0
        return float(self.truth.expected_gmv(self.users[n : n + 1], items[None], self.day).sum() / self.gmv_sum[n])

    def rank(self, cascade: Cascade, n: int, retrieval_size: int, coarse_size: int, trace: dict | None = None):
        """The serving code's ranking of request n at these sizes."""
        req = self.req
        user, ts = int(self.users[n]), float(req["ts"][n])

        def interacted(cands: np.ndarray) -> np.ndarray:  # over the full log at the request's time
            return req["events"].features(np.full(len(cands), user), np.full(len(cands), ts), cands)

        browsed = None
        if cascade.browse_share > 0:
            item, when, kind = req["log"][n]
            browsed = browsed_categories(item, when, kind, ts, cascade.categories.item_category, cascade.browse_window_s)
        return cascade.rank_features(Query(user_id=user, num_results=self.k, retrieval_size=retrieval_size,
                                           coarse_size=coarse_size),
                                     req["user_feats"][n : n + 1], req["seq_items"][n : n + 1],
                                     req["seq_extras"][n : n + 1], trace=trace, interacted=interacted, browsed=browsed)


def _measure(cascade: Cascade, oracle: _Oracle, r: int, c: int) -> dict[str, list[float]]:
    """Every request at retrieval size r and coarse size c -> metric -> one value per user."""
    rows: dict[str, list[float]] = {m: [] for m in METRICS}
    for n in range(len(oracle.users)):
        _measure_one(cascade, oracle, n, r, c, rows)
    return rows


def _measure_one(cascade: Cascade, oracle: _Oracle, n: int, r: int, c: int, rows: dict[str, list[float]]) -> None:
    """Request n at retrieval size r and coarse size c: appends one value to each metric of `rows`."""
    trace: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    res = oracle.rank(cascade, n, r, c, trace)
    # the process's CPU time for the served path (one request at a time, single-threaded
    # ONNX Runtime and FAISS): what a request costs the server, robust to other load
    rows["cpu_ms"].append((time.process_time() - c0) * 1e3)
    rows["ms"].append((time.perf_counter() - t0) * 1e3)
    o = oracle.ids[n]
    rows["recall_retrieval"].append(_hits(trace["retrieved"], o))
    rows["recall_coarse"].append(_hits(trace["coarse"], o))
    rows["recall_served"].append(_hits(res.item_ids, o))
    rows["gmv_share"].append(oracle.gmv_share(n, res.item_ids))
    is_i2i = trace["retrieved_sources"] == SOURCES.index(SOURCE_I2I)
    rows["i2i_in_retrieved"].append(float(is_i2i.mean()) if len(is_i2i) else 0.0)
    rows["i2i_in_served"].append(float(np.mean([s == SOURCE_I2I for s in res.sources])) if res.sources else 0.0)
    rows["oracle_via_i2i"].append(_hits(trace["retrieved"][is_i2i], o))
    is_browse = trace["retrieved_sources"] == SOURCES.index(SOURCE_BROWSE)
    rows["browse_in_retrieved"].append(float(is_browse.mean()) if len(is_browse) else 0.0)
    rows["oracle_via_browse"].append(_hits(trace["retrieved"][is_browse], o))


def _summary(rows: dict[str, list[float]], r: int, c: int, share: float, base: np.ndarray | None) -> dict:
    """One results row: the means (and standard errors) over the users; with `base` (the same
    users' GMV shares without i2i) the paired difference."""
    row = {"retrieval_size": r, "coarse_size": c, "i2i_share": share}
    if share != 0.0 and base is not None:
        # paired over the same users: the i2i source's effect on GMV share
        d = np.asarray(rows["gmv_share"]) - base
        row["gmv_share_diff_vs_no_i2i"] = float(d.mean())
        row["gmv_share_diff_se"] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    for m, v in rows.items():
        v = np.asarray(v)
        row[m] = float(v.mean())
        if m in WITH_SE:
            row[m + "_se"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return row


def _grid_rows(cascade: Cascade, oracle: _Oracle, settings: Settings) -> list[dict]:
    """One row per (i2i share, retrieval size, coarse size), share 0 first (the paired baseline)."""
    configs = []
    per_user: dict[tuple, np.ndarray] = {}
    share0 = cascade.i2i_share
    k = oracle.k
    try:
        for share in sorted(set(settings.i2i_shares), key=lambda x: (x != 0.0, x)):
            cascade.i2i_share = float(share)
            for r, c in settings.grid(cascade.n_items):
                rows = _measure(cascade, oracle, r, c)
                per_user[(r, c, float(share))] = np.asarray(rows["gmv_share"])
                row = _summary(rows, r, c, float(share), per_user.get((r, c, 0.0)))
                configs.append(row)
                print(f"i2i {share:.2f} R={r:5d} C={c:4d}: oracle@{k} kept  retrieval {row['recall_retrieval']:.3f}"
                      f"  coarse {row['recall_coarse']:.3f}  served {row['recall_served']:.3f}   GMV@{k} share {row['gmv_share']:.3f}"
                      f"  ({row['ms']:.1f} ms/request)", flush=True)
    finally:
        cascade.i2i_share = share0
    return configs


def _references(cascade: Cascade, oracle: _Oracle, settings: Settings) -> dict:
    """The popularity top k, k random items and (exhaustive) the fine ranker over the whole corpus."""
    n_users, n_items, k = len(oracle.users), cascade.n_items, oracle.k
    references = {}
    rng = np.random.default_rng(settings.seed + 1)
    pop_top = np.argsort(-oracle.truth.world.item_pop, kind="stable")[:k]
    references["popularity_top_k"] = {"gmv_share": float(np.mean([oracle.gmv_share(n, pop_top) for n in range(n_users)])),
                                      "recall": float(np.mean([_hits(pop_top, oracle.ids[n]) for n in range(n_users)]))}
    rand = [rng.choice(n_items, k, replace=False) for _ in oracle.users]
    references["random_k"] = {"gmv_share": float(np.mean([oracle.gmv_share(n, rand[n]) for n in range(n_users)])),
                              "recall": float(np.mean([_hits(rand[n], oracle.ids[n]) for n in range(n_users)]))}
    if settings.exhaustive:
        # the fine ranker alone over the whole corpus: the ceiling for what the early stages keep
        share_keep = cascade.i2i_share
        cascade.i2i_share = 0.0
        g, rec = [], []
        for n in range(n_users):
            res = oracle.rank(cascade, n, n_items, n_items)
            g.append(oracle.gmv_share(n, res.item_ids))
            rec.append(_hits(res.item_ids, oracle.ids[n]))
        cascade.i2i_share = share_keep
        references["fine_over_whole_corpus"] = {"gmv_share": float(np.mean(g)), "recall": float(np.mean(rec)),
                                                "gmv_share_se": float(np.std(g, ddof=1) / np.sqrt(len(g))) if len(g) > 1 else 0.0}
    return references


def run(bundle: str | Path, data_dir: str | Path, out_dir: str | Path, settings: Settings | None = None, *,
        cascade: Cascade | None = None, **fields) -> dict:
    """Evaluate the bundle's cascade against the oracle; write results.json (+ PNG) to out_dir.

    `bundle`: a bundle folder or an artifacts root (`recstack export`'s output); `settings`
    (or its fields given as keywords, e.g. `n_users=300`) says what is evaluated. Returns the
    results dict (JSON types); `configs` holds one row per (retrieval, coarse, i2i share).
    `cascade`: an already loaded Cascade (or subclass, e.g. the benchmark's teacher-as-coarse
    peer) to evaluate instead of opening `bundle`.
    """
    settings = replace(settings or Settings(), **fields)
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load(data_dir)
    truth = Truth.load(data_dir)
    day = data.test_day if settings.day is None else int(settings.day)
    if cascade is None:
        cascade = Cascade.load(bundle)
    if settings.browse_share is not None:
        cascade.browse_share = float(settings.browse_share)
    if cascade.n_items != truth.n_items or cascade.n_users != truth.n_users:
        raise ValueError(f"bundle ({cascade.n_users} users, {cascade.n_items} items) is not of this world "
                         f"({truth.n_users} users, {truth.n_items} items)")
    k = min(settings.k, cascade.n_items)
    oracle = _Oracle(truth, requests(data, day, settings.n_users, settings.seed), day, k)
    configs = _grid_rows(cascade, oracle, settings)
    references = _references(cascade, oracle, settings)
    results = {
        "k": k, "day": day, "n_users": int(len(oracle.users)), "n_items": int(cascade.n_items),
        "data_dir": str(Path(data_dir).resolve()), "bundle_version": cascade.version, "i2i_seeds": cascade.i2i_seeds,
        "browse_share": cascade.browse_share, "browse_window_s": cascade.browse_window_s,
        "oracle": "top k of the whole corpus by true E[pCTR] x pCVR x price for the day's intent (recstack.world.truth)",
        "requests": "first session of each sampled user active that day; features strictly before its time",
        "configs": configs, "references": references, "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if settings.plot:
        _plot(results, out / "cascade_recall.png", settings.default_retrieval, settings.default_coarse)
    return results


def write_report(results: dict, out_dir: str | Path, *, default_retrieval: int = 1000, default_coarse: int = 200) -> Path:
    """`out_dir/report.md` from `run`'s results: the protocol in brief, one table row per stage
    sizes and i2i share, the references. Numbers only; what they mean is for a person to write."""
    out = Path(out_dir)
    k, cfg, ref = results["k"], results["configs"], results["references"]
    plot = (out / "cascade_recall.png").exists()
    lines = [
        "# Cascade recall against the truth",
        "",
        f"{results['n_users']} users active on day {results['day']} (their first session, features strictly before it), "
        f"{results['n_items']} items, bundle `{results['bundle_version']}`, world `{results['data_dir']}`.",
        f"Oracle: {results['oracle']}. Served by the serving code (`Cascade.rank_features`).",
        "",
        *([f"![stage recall and GMV@{k} share per stage size](cascade_recall.png)", ""] if plot else []),
        f"| i2i share | retrieval | coarse | oracle@{k} kept: retrieval | coarse | served | GMV@{k} share "
        "| ± (95 % CI) | paired diff vs no i2i | ms/request |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(cfg, key=lambda c: (c["i2i_share"], c["retrieval_size"], c["coarse_size"])):
        default = c["retrieval_size"] == min(default_retrieval, results["n_items"]) and c["coarse_size"] == default_coarse
        cell = (lambda v: f"**{v}**") if default else (lambda v: str(v))
        diff = (f"{c['gmv_share_diff_vs_no_i2i']:+.4f} ± {1.96 * c['gmv_share_diff_se']:.4f}"
                if "gmv_share_diff_vs_no_i2i" in c else "—")
        lines.append("| " + " | ".join(cell(v) for v in (
            f"{c['i2i_share']:.2f}", c["retrieval_size"], c["coarse_size"], f"{c['recall_retrieval']:.3f}",
            f"{c['recall_coarse']:.3f}", f"{c['recall_served']:.3f}", f"{c['gmv_share']:.3f}",
            f"{1.96 * c['gmv_share_se']:.3f}", diff, f"{c['ms']:.1f}")) + " |")
    lines += ["", f"Bold: the serving default sizes ({default_retrieval} / {default_coarse}). "
                  "ms/request is the offline loop's time with tracing, not a serving latency.", "",
              "References (same users):", ""]
    names = {"fine_over_whole_corpus": "the fine ranker over the whole corpus (no retrieval, no coarse)",
             "popularity_top_k": f"the logging policy's popularity top {k}", "random_k": f"{k} random items"}
    for name, r in ref.items():
        lines.append(f"- {names.get(name, name)}: GMV@{k} share {r['gmv_share']:.3f}, oracle@{k} recall {r['recall']:.3f}")
    lines += ["", f"Full figures: results.json ({results['wall_seconds']} s)."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plot(results: dict, path: Path, default_retrieval: int, default_coarse: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = results["k"]
    cfg = results["configs"]
    shares = sorted({c["i2i_share"] for c in cfg})
    stages = (("recall_retrieval", "after retrieval", "C0"), ("recall_coarse", "after coarse", "C1"), ("recall_served", f"served top {k}", "C2"))
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    n_items = results["n_items"]
    by_retrieval = lambda c: c["coarse_size"] == min(default_coarse, c["retrieval_size"])  # noqa: E731
    by_coarse = lambda c: c["retrieval_size"] == min(default_retrieval, n_items)  # noqa: E731
    panels = (("retrieval_size", by_retrieval, f"coarse size {default_coarse}"),
              ("coarse_size", by_coarse, f"retrieval size {default_retrieval}"))
    ref = results["references"]
    top = 0.0
    for col_i, (vary, keep, fixed_label) in enumerate(panels):
        ax, gx = axes[0, col_i], axes[1, col_i]
        for share in shares:
            rows = sorted((c for c in cfg if keep(c) and c["i2i_share"] == share), key=lambda c: c[vary])
            ls = "-" if share == max(shares) else "--"
            xs = [c[vary] for c in rows]
            for key, label, col in stages:
                ax.errorbar(xs, [c[key] for c in rows], yerr=[1.96 * c[key + "_se"] for c in rows],
                            fmt="o" + ls, color=col, capsize=2, label=f"{label} (i2i {share:.0%})")
            gx.errorbar(xs, [c["gmv_share"] for c in rows], yerr=[1.96 * c["gmv_share_se"] for c in rows],
                        fmt="o" + ls, capsize=2, label=f"served cascade (i2i {share:.0%})")
            top = max([top] + [c["gmv_share"] for c in rows])
        for a in (ax, gx):
            a.set_xscale("log")
            a.set_xlabel(vary.replace("_", " ") + f" ({fixed_label})")
            a.grid(alpha=0.3, which="both")
        ax.set_ylabel(f"share of the oracle top {k} kept")
        gx.set_ylabel(f"GMV@{k} served / oracle's (true expected GMV)")
        for name, style in (("fine_over_whole_corpus", "-"), ("popularity_top_k", ":"), ("random_k", "-.")):
            if name in ref:
                gx.axhline(ref[name]["gmv_share"], ls=style, color="k", lw=1,
                           label=f"{name.replace('_', ' ')} {ref[name]['gmv_share']:.3f}")
        gx.legend(fontsize=7)
    for gx in axes[1]:
        gx.set_ylim(0, min(1.0, 1.4 * top + 0.02))
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{results['n_users']} users of day {results['day']}, {results['n_items']} items; bars: 95% CI over users")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
