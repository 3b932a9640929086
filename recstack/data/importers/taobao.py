"""Taobao UserBehavior (Tianchi dataset 649): `user_id,item_id,category_id,behavior_type,timestamp`,
no header, behaviour types pv / buy / cart / fav, unix seconds, 2017-11-25..2017-12-03 (China time).

    import_taobao("UserBehavior.csv", Path("data/taobao"), TaobaoConfig())

Events: every behaviour (pv = an item detail page view, the dataset's click; buy = purchase;
fav = favourite; cart = cart). Impressions: the log has none, so each pv is one shown list of
1 + `negatives` items at the pv's time: the pv'd item (click 1) and `negatives` items drawn
from that day's pvs of the same category (so in proportion to the category's popularity that
day; never the clicked item), click 0. A pv is purchased when the same user buys the same item
later that day and no later pv of it came before the buy. docs/DATA.md explains the choice.

Two passes, memory bounded by a CSV block plus one day's clicks: the CSV is streamed once
(ids mapped, events written, each day's pvs and buys spilled to Parquet), then each day's
impressions are built from its spill.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recstack.data import contract as K
from recstack.data.importers import common as C

COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
KINDS = {"pv": K.KIND_ID["click"], "buy": K.KIND_ID["purchase"], "fav": K.KIND_ID["favourite"], "cart": K.KIND_ID["cart"]}


@dataclass
class TaobaoConfig:
    start: int = 1511539200  # 2017-11-25 00:00 in China (UTC+8), in unix seconds: day 1 begins here
    n_days: int = 9  # days 1..n_days; rows outside them (the dataset has a few) are dropped and counted
    negatives: int = 4  # sampled unclicked items per pv (the list shown is 1 + negatives long)
    seed: int = 0  # seed of the negative sampling and list positions
    slice_rows: int = 1_000_000  # pvs turned into impressions at a time (bounds the impression buffer)


def _read_blocks(src: Path, chunk_bytes: int):
    opts = pcsv.ReadOptions(column_names=list(COLUMNS), block_size=chunk_bytes)
    types = {"user_id": pa.int64(), "item_id": pa.int64(), "category_id": pa.int64(), "behavior_type": pa.string(),
             "timestamp": pa.int64()}
    try:
        return pcsv.open_csv(src, read_options=opts, convert_options=pcsv.ConvertOptions(column_types=types))
    except (pa.ArrowInvalid, OSError) as e:
        raise C.SourceError(f"{src}: not a UserBehavior CSV ({', '.join(COLUMNS)}): {e}") from None


class _Pass1:
    """The streamed pass: ids, events, each day's pvs and buys spilled."""

    def __init__(self, out: Path, cfg: TaobaoConfig):
        self.cfg, self.tmp = cfg, out / C.TMP_DIR
        self.users, self.items, self.cats = C.IdMap(), C.IdMap(), C.IdMap()
        self.item_cat = C.Grow()
        self.events = C.Writer(out / K.EVENTS.file)
        self.pvs = {d: C.Writer(self.tmp / f"pv-{d:02d}.parquet") for d in range(1, cfg.n_days + 1)}
        self.buys = {d: C.Writer(self.tmp / f"buy-{d:02d}.parquet") for d in range(1, cfg.n_days + 1)}
        self.rows = self.dropped = 0

    def add(self, batch: pa.RecordBatch, src: Path) -> None:
        for name in COLUMNS:
            if batch.column(name).null_count:
                row = self.rows + int(np.flatnonzero(np.asarray(batch.column(name).is_null()))[0])
                raise C.SourceError(f"{src}: row {row + 1}: {name} is empty")
        behaviour = batch.column("behavior_type")
        kind = np.full(batch.num_rows, -1, np.int8)
        for name, k in KINDS.items():
            kind[np.asarray(pc.equal(behaviour, name))] = k
        if (kind < 0).any():
            i = int(np.flatnonzero(kind < 0)[0])
            raise C.SourceError(f"{src}: row {self.rows + i + 1}: behavior_type {behaviour[i].as_py()!r} is not one of "
                                 f"{', '.join(KINDS)}")
        ts = batch.column("timestamp").to_numpy() - self.cfg.start
        keep = (ts >= 0) & (ts < self.cfg.n_days * C.DAY_SECONDS)
        self.rows += batch.num_rows
        self.dropped += int(np.count_nonzero(~keep))
        if not keep.any():
            return
        user = self.users.map(batch.column("user_id").to_numpy()[keep])
        item = self.items.map(batch.column("item_id").to_numpy()[keep])
        cat = self.cats.map(batch.column("category_id").to_numpy()[keep])
        self.item_cat.set_new(item, cat)
        ts, kind = ts[keep].astype(np.float64), kind[keep]
        self.events.write({"user_id": user, "ts": ts, "item_id": item, "kind": kind,
                           "dwell": np.zeros(len(ts), np.float32)})
        day = (ts // C.DAY_SECONDS).astype(np.int64) + 1
        for d in np.unique(day):
            pv = (day == d) & (kind == KINDS["pv"])
            if pv.any():
                self.pvs[int(d)].write({"user_id": user[pv], "item_id": item[pv], "ts": ts[pv]})
            buy = (day == d) & (kind == KINDS["buy"])
            if buy.any():
                self.buys[int(d)].write({"user_id": user[buy], "item_id": item[buy], "ts": ts[buy]})

    def close(self) -> None:
        self.events.close()
        for w in (*self.pvs.values(), *self.buys.values()):
            w.close()


def _purchased(pv: dict[str, np.ndarray], buy: dict[str, np.ndarray], n_items: int) -> np.ndarray:
    """(P,) bool: the pv is the user's last pv of the item at or before one of that day's buys of it."""
    n_pv = len(pv["ts"])
    out = np.zeros(n_pv, bool)
    if not len(buy["ts"]) or not n_pv:
        return out
    pair = np.concatenate([pv["user_id"], buy["user_id"]]) * n_items + np.concatenate([pv["item_id"], buy["item_id"]])
    _, rank = np.unique(pair, return_inverse=True)  # one rank per (user, item): fewer than 2^31 a day
    rank = rank.reshape(-1).astype(np.int64)
    span = C.DAY_SECONDS * 1024  # > any ts of an import (n_days < 1024)
    key = rank * span + np.concatenate([pv["ts"], buy["ts"]]).astype(np.int64)
    pv_key, buy_key = key[:n_pv], key[n_pv:]
    order = np.argsort(pv_key, kind="stable")
    pos = np.searchsorted(pv_key[order], buy_key, side="right") - 1
    hit = (pos >= 0) & (rank[:n_pv][order][np.maximum(pos, 0)] == rank[n_pv:])
    out[order[pos[hit]]] = True
    return out


def _impressions(pv: dict[str, np.ndarray], bought: np.ndarray, item_cat: np.ndarray, pool: tuple[np.ndarray, np.ndarray],
                 first_session: int, cfg: TaobaoConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The lists of a slice of pvs: each pv's item and its sampled negatives, in time order."""
    pool_items, pool_start = pool  # the day's pv'd items sorted by category; category c's are pool_start[c]:[c+1]
    n, k = len(pv["ts"]), cfg.negatives
    cat = item_cat[pv["item_id"]]
    lo, size = pool_start[cat], pool_start[cat + 1] - pool_start[cat]
    items = np.empty((n, 1 + k), np.int64)
    items[:, 0] = pv["item_id"]
    valid = np.ones((n, 1 + k), bool)
    for j in range(1, 1 + k):
        pick = pool_items[lo + (rng.random(n) * size).astype(np.int64)]
        for _ in range(3):  # redraw a pick that is the clicked item (rarely needed more than once)
            same = pick == items[:, 0]
            if not same.any():
                break
            pick[same] = pool_items[lo[same] + (rng.random(int(same.sum())) * size[same]).astype(np.int64)]
        items[:, j] = pick
        valid[:, j] = pick != items[:, 0]  # a category with only the clicked item has no negative
    position = np.argsort(rng.random((n, 1 + k)), axis=1)  # the clicked item's slot is random
    rows = np.flatnonzero(valid.reshape(-1))
    rep = lambda a: np.repeat(a, 1 + k)[rows]  # noqa: E731 - per-pv column -> per-row
    click = np.zeros((n, 1 + k), bool)
    click[:, 0] = True
    purchase = click & bought[:, None]
    return {
        "ts": rep(pv["ts"]), "user_id": rep(pv["user_id"]), "session_id": rep(np.arange(first_session, first_session + n)),
        "position": position.reshape(-1)[rows], "item_id": items.reshape(-1)[rows],
        "click": click.reshape(-1)[rows], "purchase": purchase.reshape(-1)[rows],
    }


def _build_day(out: Path, day: int, item_cat: np.ndarray, n_cats: int, first_session: int, cfg: TaobaoConfig) -> dict:
    tmp = out / C.TMP_DIR
    read = lambda p: {k: v.to_numpy() for k, v in zip(pq.read_schema(p).names, pq.read_table(p).columns)} if p.exists() \
        else {"user_id": np.zeros(0, np.int64), "item_id": np.zeros(0, np.int64), "ts": np.zeros(0)}  # noqa: E731
    pv, buy = read(tmp / f"pv-{day:02d}.parquet"), read(tmp / f"buy-{day:02d}.parquet")
    order = np.lexsort((pv["item_id"], pv["user_id"], pv["ts"]))  # time order, ties broken by ids
    pv = {k: v[order] for k, v in pv.items()}
    bought = _purchased(pv, buy, len(item_cat))
    by_cat = np.argsort(item_cat[pv["item_id"]], kind="stable")
    pool = (pv["item_id"][by_cat], np.searchsorted(item_cat[pv["item_id"]][by_cat], np.arange(n_cats + 1)))
    rng = np.random.default_rng([cfg.seed, day])
    writer = C.Writer(C.day_path(out, day))
    clicks = purchases = rows = 0
    for s in range(0, len(pv["ts"]), cfg.slice_rows):
        part = {k: v[s : s + cfg.slice_rows] for k, v in pv.items()}
        imp = _impressions(part, bought[s : s + cfg.slice_rows], item_cat, pool, first_session + s, cfg, rng)
        writer.write({"day": np.full(len(imp["ts"]), day, np.int16), **imp})
        rows, clicks, purchases = rows + len(imp["ts"]), clicks + int(imp["click"].sum()), purchases + int(imp["purchase"].sum())
    writer.close()
    if not rows:
        raise C.SourceError(f"day {day} has no pv rows: nothing to build its impressions from (check --set start/n_days)")
    return {"day": day, "impressions": rows, "ctr": clicks / rows, "cvr": purchases / max(clicks, 1), "sessions": len(pv["ts"])}


def import_taobao(src: Path, out: Path, cfg: TaobaoConfig, *, bar=None, chunk_bytes: int = 64 << 20) -> dict:
    """Convert UserBehavior.csv at `src` into the data folder `out` (prepared). -> world.json's content."""
    p1 = _Pass1(out, cfg)
    try:
        for batch in _read_blocks(src, chunk_bytes):
            p1.add(batch, src)
            if bar is not None:
                bar.update(batch.num_rows)
    except pa.ArrowInvalid as e:
        raise C.SourceError(f"{src}: {e}") from None
    finally:
        p1.close()
    if not p1.events.rows:
        raise C.SourceError(f"{src}: no rows within the {cfg.n_days} days from unix time {cfg.start}")
    item_cat, n_cats = p1.item_cat.array(len(p1.items)), len(p1.cats)
    days, session = [], 0
    for d in range(1, cfg.n_days + 1):
        days.append(_build_day(out, d, item_cat, n_cats, session, cfg))
        session += days[-1]["sessions"]
    shutil.rmtree(out / C.TMP_DIR, ignore_errors=True)
    C.write_users(out, p1.users.external())
    C.write_items(out, p1.items.external(), item_cat)
    counts = {"n_users": len(p1.users), "n_items": len(p1.items), "n_categories": n_cats}
    source = {"format": "taobao", "path": str(src), "rows": p1.rows, "dropped_outside_days": p1.dropped,
              "negatives": cfg.negatives, "seed": cfg.seed, "start": cfg.start}
    return C.write_world(out, n_days=cfg.n_days, counts=counts, source=source, days=days, n_events=p1.events.rows)
