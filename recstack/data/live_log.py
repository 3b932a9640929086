"""Turn a server's impression and event logs (recstack.serving.impressions) into the tables
`recstack simulate` writes (recstack.world.schema), so a stage trains from what was served.

    live_log_to_world("artifacts/live_log", "artifacts/current", "data/live")   # then recstack train ... --data data/live

The join: an impression row (request id, item) is clicked / purchased / carted when an event of
that kind on that item carries the impression's request id (LogEvents' `request_id`); its
dwell is the click's. Times become seconds since the start of the first logged day (UTC), so
day d >= 1 is [(d - 1) x 86400, d x 86400); `world.json` keeps the epoch origin. The users
and items tables are the bundle's snapshot; every user counts as consenting. What a live log
cannot know is left out honestly: the truth columns are NaN (no true_pctr / true_pcvr), the
post-event comments and chats are 0, there is no aggregates.parquet. Rows of users or items
the bundle does not know are dropped and counted in world.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recstack import bundle as B
from recstack import features as FE
from recstack.world.schema import DAY_FILE

DAY_SECONDS = 86400


class LiveLogError(RuntimeError):
    """A log folder that cannot make a world (no finished impression files, unreadable files)."""


def read_log(log_dir: str | Path, prefix: str) -> dict[str, np.ndarray]:
    """Every finished `<prefix>-*.parquet` file of the folder, concatenated (files still being
    written, `.inprogress`, are not read)."""
    files = sorted(Path(log_dir).glob(f"{prefix}-*.parquet"))
    if not files:
        return {}
    try:
        table = pa.concat_tables([pq.read_table(f) for f in files])
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise LiveLogError(f"{log_dir}: cannot read the {prefix} log: {e}") from e
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def join_labels(imps: dict[str, np.ndarray], events: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per impression row: click, purchase, cart (bool) and dwell (the click's) from the events
    that carry its request id and item."""
    n = len(imps["item_id"])
    out = {"click": np.zeros(n, bool), "purchase": np.zeros(n, bool), "cart": np.zeros(n, bool),
           "dwell": np.zeros(n, np.float32)}
    if not n or not events:
        return out
    row_of = {(r, int(i)): k for k, (r, i) in enumerate(zip(imps["request_id"].tolist(), imps["item_id"].tolist()))}
    for rid, item, kind, dwell in zip(events["request_id"].tolist(), events["item_id"].tolist(),
                                      events["kind"].tolist(), events["dwell"].tolist()):
        k = row_of.get((rid, int(item))) if rid else None
        if k is None:
            continue
        if kind == FE.BEHAVIOUR_CLICK:
            out["click"][k] = True
            out["dwell"][k] = max(out["dwell"][k], dwell)
        elif kind == FE.BEHAVIOUR_PURCHASE:
            out["purchase"][k] = True
        elif kind == FE.BEHAVIOUR_CART:
            out["cart"][k] = True
    out["click"] |= out["purchase"]  # a purchase from the list went through the item's page
    return out


def live_log_to_world(log_dir: str | Path, bundle: str | Path, out: str | Path) -> dict:
    """Write a world folder (users, items, events, impressions/day=NN, world.json) from the logs
    and the bundle's snapshot; -> the world.json written."""
    bdir = B.resolve_bundle(bundle)
    manifest = json.loads((bdir / B.MANIFEST).read_text())
    vocab = FE.Vocab.from_dict(manifest["vocab"])
    imps, events = read_log(log_dir, "impressions"), read_log(log_dir, "events")
    if not imps:
        raise LiveLogError(f"{log_dir}: no finished impressions-*.parquet files (a server writes them as it serves)")
    keep_i = (imps["user_id"] < vocab.n_users) & (imps["item_id"] < vocab.n_items)
    imps = {k: v[keep_i] for k, v in imps.items()}
    dropped_e = 0
    if events:
        keep_e = (events["user_id"] < vocab.n_users) & (events["item_id"] < vocab.n_items)
        dropped_e = int((~keep_e).sum())
        events = {k: v[keep_e] for k, v in events.items()}
    all_ts = np.concatenate([imps["ts"], events["ts"] if events else np.zeros(0)])
    origin = float(np.floor(all_ts.min() / DAY_SECONDS) * DAY_SECONDS)
    labels = join_labels(imps, events)
    ts = imps["ts"] - origin
    day = (np.floor(ts / DAY_SECONDS) + 1).astype(np.int16)
    _, session = np.unique(imps["request_id"], return_inverse=True)
    n = len(ts)
    table = {
        "day": day, "ts": ts, "user_id": imps["user_id"].astype(np.int64), "session_id": session.astype(np.int64),
        "position": imps["position"].astype(np.int64), "item_id": imps["item_id"].astype(np.int64),
        "click": labels["click"], "purchase": labels["purchase"], "purchase_observed": labels["purchase"],
        "dwell": labels["dwell"], "comments": np.zeros(n, np.int16), "chatted": np.zeros(n, np.int16),
        "cart": labels["cart"].astype(np.int16), "true_pctr": np.full(n, np.nan, np.float32),
        "true_pcvr": np.full(n, np.nan, np.float32),
    }
    out = Path(out)
    (out / "impressions").mkdir(parents=True, exist_ok=True)
    n_days = int(day.max())
    days = {}
    for d in range(1, n_days + 1):
        rows = np.flatnonzero(day == d)
        order = rows[np.lexsort((table["position"][rows], table["ts"][rows]))]
        pq.write_table(pa.table({k: v[order] for k, v in table.items()}), out / DAY_FILE.format(day=d))
        days[str(d)] = {"impressions": int(len(rows)), "ctr": float(table["click"][rows].mean()) if len(rows) else 0.0}
    ev = events or {"user_id": np.zeros(0, np.int64), "ts": np.zeros(0), "item_id": np.zeros(0, np.int64),
                    "kind": np.zeros(0, np.int8), "dwell": np.zeros(0, np.float32)}
    order = np.lexsort((ev["ts"], ev["user_id"]))
    pq.write_table(pa.table({"user_id": ev["user_id"][order].astype(np.int64), "ts": (ev["ts"][order] - origin),
                             "item_id": ev["item_id"][order].astype(np.int64), "kind": ev["kind"][order].astype(np.int8),
                             "dwell": ev["dwell"][order].astype(np.float32)}), out / "events.parquet")
    users = pq.read_table(bdir / B.SNAPSHOT_USERS)
    pq.write_table(users.append_column("consent", pa.array(np.ones(users.num_rows, bool))), out / "users.parquet")
    pq.write_table(pq.read_table(bdir / B.SNAPSHOT_ITEMS), out / "items.parquet")
    world = {"format_version": 1, "preset": None, "seed": None, "source": "live log", "log_dir": str(log_dir),
             "bundle": manifest.get("version"), "origin_epoch": origin, "n_days": n_days, "history_days": 0,
             "day_seconds": DAY_SECONDS, "now": float(all_ts.max() - origin), "vocab": vocab.to_dict(), "days": days,
             "n_events": int(len(order)), "dropped_unknown": {"impressions": int((~keep_i).sum()), "events": dropped_e}}
    (out / "world.json").write_text(json.dumps(world, indent=2))
    return world
