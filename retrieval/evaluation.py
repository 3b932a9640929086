"""Retrieval recall against logged clicks and against the oracle, for a trained checkpoint.

    python -m retrieval.evaluation --checkpoint runs/retrieval/checkpoint.pt --split valid --out recall.json

Three lists of K items per request, each over the whole corpus:
- `model`: the two-tower's top K by inner product (exact search);
- `served`: the two sources merged as the serving cascade merges them (the two-tower's
  first K - round(share K), then the nearest neighbours of the user's newest distinct
  behaviours, then the two-tower's rest; `recstack/serving/cascade.py: Cascade.retrieve`);
- `served_browse`: the same with the browse source as well (`recstack.browse`: the
  best items, by the user vector, of the categories the user browsed in the last hour);
- `popularity`: the K items most clicked in the fit days' impressions (the baseline train.py prints);
- `popularity_log`: the K items most clicked in the whole behaviour log before the evaluation
  day (history days included): popularity from the same clicks the "log" positives learn from.
Two targets:
- `clicks`: the clicked impressions of the evaluation day (hit: the clicked item is in the list);
- `oracle`: for the first request of sampled users active that day, the 50 items of highest
  true expected GMV (`recstack.world.truth.Truth.oracle_top_k`; hit share |oracle ∩ list| / 50).
And two ceilings from the simulator's truth, on a sample of those clicks: the user's top K
by true pCTR that day (what taste alone predicts; a click also needs the logging policy to
show the item), and the top K by true pCTR times the policy's probability of showing the
item that day (`exposure_ceiling`: what perfect knowledge of the world could reach), and the
same with each session's intents drawn from the world's prior (`prior_intents`: what exact
knowledge of every user's long-term state could reach without the day's intents).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from recstack.data import SimData, load
from recstack.evaluation.cascade import requests as first_requests, user_logs
from recstack import browse
from recstack.browse import CategoryItems, browsed_categories
from recstack.features import Vocab
from recstack.training import checkpoint
from recstack.world.truth import Truth, expected_sigmoid

from retrieval.config import Config, checkpoint_config  # noqa: F401  (Config: the stage's settings)
from retrieval.inputs import STAGE, USER_INPUTS, embed_items, embed_users, materialise, serving_stats, top_k_inner_product
from retrieval.model import TwoTower, build_model
from retrieval.positives import log_events

KS = (50, 200, 1000)


def served_lists(user_emb: np.ndarray, item_emb: np.ndarray, seq_items: np.ndarray, k: int,
                 share: float = 0.3, n_seeds: int = 5, browsed: list[np.ndarray] | None = None,
                 categories: CategoryItems | None = None, browse_share: float = browse.DEFAULT_SHARE,
                 browse_replaces_i2i: bool = browse.DEFAULT_REPLACES_I2I) -> np.ndarray:
    """The serving merge of the sources, exact search: (N, D), (I, D), (N, L, 5) -> (N, k) ids.

    Each row: the ANN list's first k - n_i2i - n_browse, then up to n_i2i distinct neighbours
    of the newest n_seeds distinct sequence items (rank-major across seeds, seeds excluded, not
    already taken), then (with `browsed`, one array of categories per row) up to n_browse of
    the best items of those categories not already taken, then the ANN list's rest; a user
    without behaviours gets the ANN list. A row with browse categories gets no i2i share when
    `browse_replaces_i2i` (the serving default, recstack.serving.cascade).
    """
    n_i2i, n_b = int(round(share * k)), int(round(browse_share * k)) if browsed is not None else 0
    ann = top_k_inner_product(user_emb, item_emb, k)  # (N, k)
    out = ann.copy()
    empty = np.zeros(0, np.int64)
    for n in range(len(user_emb)):
        ids = seq_items[n, :, 0]
        ids = ids[ids > 0] - 1
        _, first = np.unique(ids, return_index=True)
        seeds = ids[np.sort(first)][:n_seeds]
        has_browse = bool(n_b) and len(browsed[n]) > 0
        ni = n_i2i if len(seeds) and not (has_browse and browse_replaces_i2i) else 0
        nb = min(k - ni, n_b) if has_browse else 0
        head, i2i = ann[n, : k - ni - nb], empty
        if ni:
            nbrs = top_k_inner_product(item_emb[seeds], item_emb, -(-2 * ni // len(seeds)) + 1).T.ravel()  # rank-major
            nbrs = nbrs[~np.isin(nbrs, seeds) & ~np.isin(nbrs, head)]
            _, first = np.unique(nbrs, return_index=True)
            i2i = nbrs[np.sort(first)][:ni]
        taken = np.concatenate([head, i2i])
        brw = categories.ranked(user_emb[n], item_emb, browsed[n], len(taken) + nb) if nb else empty
        brw = brw[~np.isin(brw, taken)][:nb]
        tail = ann[n, k - ni - nb :]
        tail = tail[~np.isin(tail, np.concatenate([i2i, brw]))]
        out[n] = np.concatenate([head, i2i, brw, tail])[:k]
    return out


def _browsed(data: SimData, users: np.ndarray, ts: np.ndarray) -> list[np.ndarray]:
    """Each request's browse-source categories, from the log strictly before its time."""
    cat = data.items.cols[:, 0] - 1
    return [browsed_categories(item, when, kind, t, cat) for (item, when, kind), t in zip(user_logs(data.events, users, ts), ts)]


def _lists(model: TwoTower, inputs: dict[str, np.ndarray], popular: dict[str, np.ndarray], ks, item_emb: np.ndarray,
           browsed: list[np.ndarray] | None = None, categories: CategoryItems | None = None
           ) -> dict[tuple[str, int], np.ndarray]:
    """(list name, K) -> (N, K) ids. The served list is built for each K (its i2i quota is a share of K)."""
    user_emb = embed_users(model, inputs)
    ann = top_k_inner_product(user_emb, item_emb, max(ks))
    out = {}
    for k in ks:
        out["model", k] = ann[:, :k]
        out["served", k] = served_lists(user_emb, item_emb, inputs["seq_items"], k)
        if browsed is not None:
            out["served_browse", k] = served_lists(user_emb, item_emb, inputs["seq_items"], k, browsed=browsed,
                                                   categories=categories)
        for name, order in popular.items():
            out[name, k] = np.broadcast_to(order[:k], (len(user_emb), k))
    return out


def click_recall(model: TwoTower, data: SimData, day: int, popular: dict[str, np.ndarray], item_emb: np.ndarray,
                 ks=KS, max_clicks: int = 2000, seed: int = 0) -> dict[str, float]:
    """Recall@K of up to `max_clicks` sampled clicked impressions of `day`, per list."""
    clicks = data.examples(day, clicked_only=True)
    rows = np.sort(np.random.default_rng(seed).permutation(len(clicks))[:max_clicks])
    inputs = materialise(clicks.subset(rows), USER_INPUTS + ("item_id",))
    out: dict[str, float] = {"clicks": int(len(rows))}
    browsed = _browsed(data, clicks.imps["user_id"][rows], clicks.imps["ts"][rows])
    cats = CategoryItems(data.items.cols[:, 0] - 1)
    for (name, k), ids in _lists(model, inputs, popular, ks, item_emb, browsed, cats).items():
        out[f"{name}@{k}"] = float((ids == inputs["item_id"][:, None]).any(axis=1).mean())
    return out


def oracle_recall(model: TwoTower, data: SimData, truth: Truth, day: int, popular: dict[str, np.ndarray], item_emb: np.ndarray,
                  ks=KS, n_users: int = 300, k_oracle: int = 50, seed: int = 0) -> dict[str, float]:
    """Share of each sampled user's oracle top-k_oracle (true expected GMV) in each list, per K."""
    req = first_requests(data, day, n_users, seed)
    oracle, _ = truth.oracle_top_k(req["user_id"], day, k_oracle)
    out: dict[str, float] = {"users": int(len(oracle))}
    browsed = _browsed(data, req["user_id"], req["ts"])
    cats = CategoryItems(data.items.cols[:, 0] - 1)
    for (name, k), ids in _lists(model, {k: req[k] for k in USER_INPUTS}, popular, ks, item_emb, browsed, cats).items():
        out[f"{name}@{k}"] = float(np.mean([np.isin(o, row).mean() for o, row in zip(oracle, ids)]))
    return out


def pctr_ceiling(data: SimData, truth: Truth, day: int, ks=KS, max_clicks: int = 1000, seed: int = 0) -> dict[str, float]:
    """Recall@K of sampled clicks of `day` in the clicking user's top K by true pCTR that day."""
    imps = data.impressions(day)
    clicked = np.flatnonzero(imps["click"])
    rows = np.sort(np.random.default_rng(seed).permutation(clicked)[:max_clicks])
    all_items = np.arange(data.items.n)[None, :]
    hits = {k: [] for k in ks}
    for r in rows:
        logit = truth.click_logit(imps["user_id"][r : r + 1], all_items, day)[0]  # (I,)
        rank = int((logit > logit[imps["item_id"][r]]).sum())  # items strictly better than the clicked one
        for k in ks:
            hits[k].append(rank < k)
    return {"clicks": int(len(rows)), **{f"true_pctr@{k}": float(np.mean(hits[k])) for k in ks}}


def exposure_ceiling(data: SimData, truth: Truth, day: int, ks=KS, max_clicks: int = 500, sessions: int = 200,
                     seed: int = 0, prior_intents: bool = False) -> dict[str, float]:
    """Recall@K of sampled clicks of `day` in the clicking user's top K by the simulator's own
    expected clicks that day: P(the logging policy shows the item in a session) x true pCTR,
    the showing probability estimated from `sessions` simulated sessions per user with the
    day's true intents. No model that sees only the logs can know that day's intents, so this
    bounds what any retrieval list can reach on next-day clicks.

    prior_intents: each simulated session draws its intents from the world's own prior instead
    (`World.intents`: per slot a habitual category or a taste-led fresh draw), and the expected
    clicks average shown x pCTR over those sessions. That is the ceiling of a model that knows
    every user's long-term state exactly (taste, habits, favourite shops and brands) and the
    policy, but not the day's intents nor the browsing that reveals them (keys
    `exposure_x_pctr_prior@K`)."""
    w, cfg = truth.world, truth.world.cfg
    imps = data.impressions(day)
    clicked = np.flatnonzero(imps["click"])
    rows = np.sort(np.random.default_rng(seed).permutation(clicked)[:max_clicks])
    rng = np.random.default_rng(seed + 1)
    by_cat = np.argsort(w.item_cat, kind="stable")
    start = np.searchsorted(w.item_cat[by_cat], np.arange(cfg.n_categories + 1))
    cum_pop = np.cumsum(w.item_pop)
    hits = {k: [] for k in ks}
    for r in rows:
        u = int(imps["user_id"][r])
        if prior_intents:
            intent = w.intents(np.full(sessions, u), rng)  # (S, k): each session its own draw
        else:
            intent = np.repeat(truth.intent(np.array([u]), day), sessions, axis=0)  # (S, k): the day's
        pop = np.minimum(np.searchsorted(cum_pop, rng.random((sessions, cfg.policy_pool_popular)) * cum_pop[-1]), cfg.n_items - 1)
        ic = intent[np.arange(sessions)[:, None], rng.integers(0, intent.shape[1], (sessions, cfg.policy_pool_intent))]
        cnt = start[ic + 1] - start[ic]
        own = by_cat[np.minimum(start[ic] + (rng.random(ic.shape) * np.maximum(cnt, 1)).astype(np.int64), cfg.n_items - 1)]
        pool = np.concatenate([pop, np.where(cnt > 0, own, pop[:, : ic.shape[1]])], axis=1)  # (S, P)
        score = (cfg.policy_popularity_weight * np.log(w.item_pop[pool]) + cfg.policy_affinity_weight
                 * (w.item_latent[pool] @ w.taste[u]) + cfg.policy_noise * rng.normal(size=pool.shape))
        shown = np.zeros(pool.shape, dtype=bool)  # each session's top impressions_per_session distinct items
        for s in range(sessions):
            ids, first = np.unique(pool[s], return_index=True)
            top = first[np.argsort(-score[s, first])[: cfg.impressions_per_session]]
            shown[s, top] = True
        if prior_intents:  # pCTR depends on the session's intents: average shown x pCTR
            p = expected_sigmoid(w.click_logit(np.full(sessions, u), pool, intent), float(cfg.click_noise))  # (S, P)
            expected = np.bincount(pool[shown], weights=p[shown], minlength=cfg.n_items) / sessions
        else:
            exposure = np.bincount(pool[shown], minlength=cfg.n_items) / sessions  # (I,)
            expected = exposure * truth.pctr(np.array([u]), np.arange(cfg.n_items)[None, :], day)[0]
        e = expected[imps["item_id"][r]]
        rank = (expected > e).sum() + 0.5 * ((expected == e).sum() - 1)  # ties (never shown: 0) take their mean place
        for k in ks:
            hits[k].append(rank < k)
    name = "exposure_x_pctr_prior" if prior_intents else "exposure_x_pctr"
    return {"clicks": int(len(rows)), "sessions_per_user": sessions, **{f"{name}@{k}": float(np.mean(hits[k])) for k in ks}}


def load_model(path: str | Path) -> tuple[TwoTower, Config, dict]:
    """A retrieval checkpoint -> (model in eval mode, its config, the checkpoint)."""
    ckpt = checkpoint.load(path, stage=STAGE)
    cfg = checkpoint_config(ckpt["config"])
    model = build_model(cfg, Vocab.from_dict(ckpt["vocab"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt


def run(path: str | Path, data_dir: str | Path | None = None, split: str | None = None, *, ks=KS,
        n_users: int = 300, max_clicks: int = 2000, ceiling: bool = True, ceiling_clicks: int = 500) -> dict:
    """Click and oracle recall of a checkpoint on its split's evaluation day (or `split`'s)."""
    model, cfg, ckpt = load_model(path)
    data = load(data_dir or ckpt["data_dir"])
    split = split or cfg.split
    fit_days, day = data.split_days(split)
    imps = data.impressions(fit_days)
    counts = np.bincount(imps["item_id"][imps["click"].astype(bool)], minlength=data.items.n)
    log_counts = np.bincount(log_events(data, ("click",), day)["item_id"], minlength=data.items.n)
    popular = {"popularity": np.argsort(-counts, kind="stable"), "popularity_log": np.argsort(-log_counts, kind="stable")}
    ks = tuple(k for k in ks if k <= data.items.n)
    item_emb = embed_items(model, data.items, serving_stats(cfg, data, day))
    truth = Truth.load(data.root)
    out = {"split": split, "day": int(day), "clicks": click_recall(model, data, day, popular, item_emb, ks, max_clicks),
           "oracle": oracle_recall(model, data, truth, day, popular, item_emb, ks, n_users)}
    if ceiling:
        out["ceiling"] = {**pctr_ceiling(data, truth, day, ks, 2 * ceiling_clicks),
                          **exposure_ceiling(data, truth, day, ks, ceiling_clicks),
                          **exposure_ceiling(data, truth, day, ks, ceiling_clicks, prior_intents=True)}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="data directory (default: the checkpoint's)")
    p.add_argument("--split", choices=("test", "valid"), default=None, help="default: the checkpoint's")
    p.add_argument("--users", type=int, default=300, help="users sampled for the oracle recall")
    p.add_argument("--clicks", type=int, default=2000, help="clicks sampled for the click recall")
    p.add_argument("--no-ceiling", action="store_true", help="skip the truth ceilings (the exposure one simulates sessions: minutes)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    res = run(a.checkpoint, a.data, a.split, n_users=a.users, max_clicks=a.clicks, ceiling=not a.no_ceiling)
    text = json.dumps(res, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
