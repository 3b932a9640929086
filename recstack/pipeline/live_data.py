"""The data folders of the live loop (recstack.pipeline.live).

    window_world("live/world", "live/window", days=4)        # the first 4 days: the initial training window
    n = day_log_world(log_dir, bundle, "replay-d5-", t0, "live/day05/world")   # one served day, as a world

`window_world` cuts a simulated world to its first days (the later days are the live ones: the
initial models must not see them). `day_log_world` turns one day of a server's impression log
(the rows whose request id starts with the day's prefix, logged at or after `since`, the
start of that day's replay) into a world folder through `recstack.data.live_log.live_log_to_world`,
with the history the server ranked them with: every event the server accepted (its event log)
and the snapshot of the bundle it served (absolute times: `created` minus `seconds_ago`), so
training computes each impression's sequence and interacted features from the same events the
server did.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recstack import bundle as B
from recstack.data.live_log import live_log_to_world, read_log
from recstack.serving.loading import snapshot_time
from recstack.serving.impressions import EVENT_SCHEMA, IMPRESSION_SCHEMA
from recstack.world.schema import DAY_FILE

KEEP_FILES = ("users.parquet", "items.parquet", "truth_users.parquet", "truth_items.parquet", "truth_intents.parquet",
              "truth_categories.parquet")


def window_world(src: str | Path, out: str | Path, days: int, end_epoch: float | None = None) -> dict:
    """Write `src` cut to its first `days` days into `out` (impressions, events before the end
    of day `days`, aggregates, world.json); -> the world.json written (last, so a half-written
    folder is refused by the loader). `end_epoch`: the window's end as an absolute time (the
    live loop's virtual clock starts there): world.json's `origin_epoch` is set so that every
    bundle exported from the window anchors its snapshot at that time."""
    src, out = Path(src), Path(out)
    world = json.loads((src / "world.json").read_text())
    if world["n_days"] < days:
        raise ValueError(f"{src}: {world['n_days']} days, the window needs {days}")
    (out / "impressions").mkdir(parents=True, exist_ok=True)
    for name in KEEP_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    for d in range(1, days + 1):
        shutil.copyfile(src / DAY_FILE.format(day=d), out / DAY_FILE.format(day=d))
    end = (world.get("history_days", 0) + days) * world.get("day_seconds", 86400)
    events = pq.read_table(src / "events.parquet")
    events = events.filter(pc.less(events.column("ts"), end))
    pq.write_table(events, out / "events.parquet")
    if (src / "aggregates.parquet").exists():
        agg = pq.read_table(src / "aggregates.parquet")
        pq.write_table(agg.filter(pc.less_equal(agg.column("day"), days)), out / "aggregates.parquet")
    world.update(n_days=days, now=float(end), days=world["days"][:days], n_events=events.num_rows,
                 window_of=str(src))
    if end_epoch is not None:
        world["origin_epoch"] = float(end_epoch) - float(end)
    (out / "world.json").write_text(json.dumps(world, indent=2))
    return world


def snapshot_events(bundle_dir: str | Path) -> dict[str, np.ndarray]:
    """The bundle's feature-store snapshot as event-log rows at absolute times (no request id)."""
    bdir = Path(bundle_dir)
    manifest = json.loads((bdir / B.MANIFEST).read_text())
    t = pq.read_table(bdir / B.SNAPSHOT_BEHAVIOURS)
    n = t.num_rows
    return {"user_id": t.column("user_id").to_numpy().astype(np.int64),
            "ts": snapshot_time(manifest) - t.column("seconds_ago").to_numpy().astype(np.float64),
            "item_id": t.column("item_id").to_numpy().astype(np.int64), "kind": t.column("kind").to_numpy().astype(np.int8),
            "dwell": t.column("dwell").to_numpy().astype(np.float32), "request_id": np.array([""] * n, dtype=object)}


def day_rows(log_dir: str | Path, prefix: str, since: float) -> dict[str, np.ndarray]:
    """The finished impression-log rows of one day's replay: request id starting with `prefix`,
    logged at or after `since` (an interrupted attempt of the same day is left out)."""
    imps = read_log(log_dir, "impressions")
    if not imps:
        return {}
    keep = np.array([r.startswith(prefix) for r in imps["request_id"].tolist()], bool) & (imps["ts"] >= since)
    return {k: v[keep] for k, v in imps.items()}


def day_log_world(log_dir: str | Path, bundle_dir: str | Path, prefix: str, since: float, out: str | Path) -> dict:
    """One served day as a world folder (see the module docstring) -> {"impressions": rows
    logged, "events": events in the history, "world": world.json}."""
    out = Path(out)
    imps = day_rows(log_dir, prefix, since)
    if not imps or not len(imps["item_id"]):
        raise ValueError(f"{log_dir}: no finished impression rows of {prefix}* since {since:.0f}")
    logged = read_log(log_dir, "events")
    snap = snapshot_events(bundle_dir)
    events = {k: np.concatenate([snap[k], logged[k]]) if logged else snap[k] for k in snap}
    src = out / "log"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    pq.write_table(pa.table({k: imps[k] for k in IMPRESSION_SCHEMA.names}, schema=IMPRESSION_SCHEMA),
                   src / "impressions-day.parquet")
    pq.write_table(pa.table({k: events[k] for k in EVENT_SCHEMA.names}, schema=EVENT_SCHEMA), src / "events-all.parquet")
    world = live_log_to_world(src, bundle_dir, out)
    return {"impressions": int(len(imps["item_id"])), "events": int(len(events["ts"])), "world": world}
