"""The retrieval stage's training positives: which (user, time, item) events it learns from.

Two sources (`Config.positives`):

- "impressions": the clicked impressions of the fit days, each seen at its impression's time
  (the request the list answered);
- "log": the behaviour log (events.parquet) before the evaluation day, every event whose
  kind is in `Config.positive_kinds`, each seen at the event's time. The log reaches back over
  the world's history days as well, so it holds several times the impression clicks, and its
  views, favourites and carts say which categories, shops and brands a user is after.
  Each event is seen at the start of its session (`Config.session_gap_s`): a list is
  requested before the session's clicks, so its behaviours never include them.

Each positive becomes the two towers' inputs (the user's profile and behaviours strictly
before the positive's time, the item's attributes), built with the functions serving uses.
"""
from __future__ import annotations

import numpy as np

from recstack import features as FE
from recstack.data import SimData

KINDS = FE.EVENT_KINDS  # ("click", "purchase", "view", "favourite", "cart")


def day_start(data: SimData, day: int) -> float:
    """The absolute time at which simulated day `day` (>= 1) begins."""
    return float((int(data.world["history_days"]) + day - 1) * float(data.world.get("day_seconds", 86_400.0)))


def session_starts(user: np.ndarray, ts: np.ndarray, gap_s: float) -> np.ndarray:
    """Each event's session start: the time of the first event of its run of the user's events
    (any kind) with no two consecutive ones more than `gap_s` apart. (N,), (N,) -> (N,) float64.
    gap_s = 0: each event's own time."""
    ts = np.asarray(ts, dtype=np.float64)
    if gap_s <= 0 or len(ts) == 0:
        return ts.copy()
    order = np.lexsort((ts, user))
    u, t = np.asarray(user)[order], ts[order]
    new = np.ones(len(t), dtype=bool)
    new[1:] = (u[1:] != u[:-1]) | (t[1:] - t[:-1] > gap_s)
    start_sorted = t[np.flatnonzero(new)[np.cumsum(new) - 1]]
    out = np.empty_like(ts)
    out[order] = start_sorted
    return out


def log_events(data: SimData, kinds: tuple[str, ...], before_day: int, session_gap_s: float = 0.0) -> dict[str, np.ndarray]:
    """Events of `kinds` strictly before day `before_day` -> {"user_id", "ts", "item_id"} (N,), in
    log order; with session_gap_s > 0, "ts" is the start of the event's session (`session_starts`
    over the whole log), the time a request for that session's list would have been made."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"positive_kinds: unknown kinds {unknown}; expected a subset of {KINDS}")
    ev = data.events
    ts = session_starts(ev["user_id"], ev["ts"], session_gap_s) if session_gap_s > 0 else ev["ts"]
    keep = np.isin(ev["kind"], [KINDS.index(k) for k in kinds]) & (ev["ts"] < day_start(data, before_day))
    return {"user_id": ev["user_id"][keep].astype(np.int64), "ts": np.asarray(ts, dtype=np.float64)[keep],
            "item_id": ev["item_id"][keep].astype(np.int64)}


def tower_inputs(data: SimData, users: np.ndarray, ts: np.ndarray, items: np.ndarray,
                 chunk: int = 8192) -> dict[str, np.ndarray]:
    """(N,) users, times, items -> the two towers' inputs for each (user at ts, item) pair plus
    `item_id` and `day`: user_feats (N, 4), seq_items (N, L, 5), seq_extras (N, L, 3), item_feats
    (N, 5), item_dense (N, 1), item_id (N,), day (N,): ts's day, whose item statistics a tower
    that reads them gets (retrieval.inputs.add_row_stats). Behaviours are those strictly before ts, as in training on impressions and
    in serving."""
    if len(users) == 0:
        raise ValueError("no positives to build inputs for")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("user_feats", "seq_items", "seq_extras")}
    for s in range(0, len(users), chunk):
        u, t = users[s : s + chunk], ts[s : s + chunk]
        hist = FE.history_features(data.behaviours, u, t, data.items)
        parts["user_feats"].append(data.users.feats(u))
        parts["seq_items"].append(hist.seq_items)
        parts["seq_extras"].append(hist.seq_extras)
    out = {k: np.ascontiguousarray(np.concatenate(v)) for k, v in parts.items()}
    out["item_feats"] = data.items.feats(items)
    out["day"] = data.day_of(ts)
    out["item_dense"] = data.items.dense(items)
    out["item_id"] = np.asarray(items, dtype=np.int64)
    return out


def log_positives(data: SimData, kinds: tuple[str, ...], before_day: int, session_gap_s: float = 0.0) -> dict[str, np.ndarray]:
    """The training rows of the "log" source: `tower_inputs` of every event of `kinds` before
    `before_day`, each seen at its session's start (see `log_events`)."""
    ev = log_events(data, kinds, before_day, session_gap_s)
    if len(ev["item_id"]) < 2:
        raise ValueError(f"{len(ev['item_id'])} log events of kinds {list(kinds)} before day {before_day}; need at least 2")
    return tower_inputs(data, ev["user_id"], ev["ts"], ev["item_id"])
