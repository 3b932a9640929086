"""Ali-CCP (Alibaba Click and Conversion Prediction, Tianchi dataset 408; the ESMM paper's data).

A source folder holds sample_skeleton_{train,test}.csv and common_features_{train,test}.csv
(the test pair optional). Skeleton rows: `sample_id,click,conversion,common_feature_index,
feature_num,feature_list`; common-features rows: `common_feature_index,feature_num,feature_list`.
A feature list is `field\\x02feature_id\\x03value` entries joined by `\\x01`. The fields read:
user 101 (user id), 124 (gender), 125 (age), 126 (consumption level -> activity), from the
common features; item 205 (item id), 206 (category), 207 (shop), 216 (brand), from the
skeleton. A field a row lacks maps to its own "absent" id.

Impressions: one per skeleton row (click and conversion labels as given). The dataset has no
timestamps, so time is the file order: the train file's rows are spread evenly over days
1..n_days-1 (the test file's are day n_days; without a test file the train file fills all
n_days), each row's ts its place in its day. A request (one common_feature_index run) is a
session. Events: the clicks and purchases of the impressions at their ts, so a row's user
sequence is that user's earlier clicks in file order (never its own: sequences hold
behaviours strictly before the impression).

Memory: a CSV block, the common-features map (five ints per request) and the id maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from recstack.data import contract as K
from recstack.data.importers import common as C

SKELETON = ("sample_id", "click", "conversion", "common_feature_index", "feature_num", "feature_list")
COMMON = ("common_feature_index", "feature_num", "feature_list")
USER_FIELDS = {"user": "101", "gender": "124", "age": "125", "activity": "126"}
ITEM_FIELDS = {"item": "205", "category": "206", "shop": "207", "brand": "216"}
ABSENT = -1  # the raw id of a field a row does not have


@dataclass
class AliCCPConfig:
    n_days: int = 3  # train rows over days 1..n_days-1, test rows on day n_days (>= 2 with a test file)


def _csv(path: Path, names: tuple[str, ...], chunk_bytes: int):
    types = {n: pa.string() for n in names}
    types.update({n: pa.int64() for n in ("sample_id", "click", "conversion", "feature_num") if n in names})
    opts = pcsv.ReadOptions(column_names=list(names), block_size=chunk_bytes)
    # the feature lists hold \x01..\x03 but never a comma or a quote
    parse = pcsv.ParseOptions(quote_char=False)
    try:
        return pcsv.open_csv(path, read_options=opts, parse_options=parse, convert_options=pcsv.ConvertOptions(column_types=types))
    except (pa.ArrowInvalid, OSError) as e:
        raise C.SourceError(f"{path}: not an Ali-CCP CSV ({','.join(names)}): {e}") from None


def parse_fields(feature_list: pa.Array, fields: dict[str, str], path: Path, first_row: int) -> dict[str, np.ndarray]:
    """(N,) feature-list strings -> {name: (N,) int64 feature id of that field, ABSENT without one}."""
    entries = pc.split_pattern(feature_list, "\x01")
    parent = np.asarray(pc.list_parent_indices(entries))
    flat = pc.list_flatten(entries)
    parts = pc.extract_regex(flat, r"^(?P<field>[^\x02]*)\x02(?P<fid>[^\x03]*)\x03")
    if parts.null_count:
        bad = int(np.flatnonzero(np.asarray(parts.is_null()))[0])
        raise C.SourceError(f"{path}: row {first_row + int(parent[bad]) + 1}: feature {flat[bad].as_py()!r} is not "
                            "field\\x02id\\x03value")
    field, fid = parts.field("field"), parts.field("fid")
    out = {}
    for name, code in fields.items():
        hit = np.asarray(pc.equal(field, code))
        values = np.full(len(feature_list), ABSENT, np.int64)
        try:
            ids = np.asarray(pc.cast(pc.filter(fid, hit), pa.int64()))
        except pa.ArrowInvalid as e:
            raise C.SourceError(f"{path}: field {code}: a feature id that is not an integer ({e})") from None
        values[parent[hit][::-1]] = ids[::-1]  # reversed so that a row's first entry of the field wins
        out[name] = values
    return out


def _common(path: Path, chunk_bytes: int, bar) -> dict[str, tuple[int, ...]]:
    """common_feature_index -> (user, gender, age, activity) raw ids."""
    table: dict[str, tuple[int, ...]] = {}
    rows = 0
    for batch in _csv(path, COMMON, chunk_bytes):
        f = parse_fields(batch.column("feature_list"), USER_FIELDS, path, rows)
        for key, *values in zip(batch.column("common_feature_index").to_pylist(), *(f[n] for n in USER_FIELDS)):
            table[key] = tuple(int(v) for v in values)
        rows += batch.num_rows
        if bar is not None:
            bar.update(batch.num_rows)
    return table


def _count_rows(path: Path) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


class _State:
    """Ids and per-id features across the skeleton files; one impressions file open at a time."""

    def __init__(self, out: Path):
        self.out = out
        self.maps = {n: C.IdMap() for n in (*USER_FIELDS, *ITEM_FIELDS)}
        self.user_feats = {n: C.Grow() for n in ("gender", "age", "activity")}
        self.item_feats = {n: C.Grow() for n in ("category", "shop", "brand")}
        self.events = C.Writer(out / K.EVENTS.file)
        self.day_writer: C.Writer | None = None
        self.day, self.days = 0, []
        self.session, self.last_key, self.position = -1, None, 0
        self.session_day, self.session_ts = 0, 0.0
        self._clicks = self._buys = 0

    def open_day(self, day: int) -> None:
        self.close_day()
        self.day, self.day_writer, self._clicks, self._buys = day, C.Writer(C.day_path(self.out, day)), 0, 0

    def close_day(self) -> None:
        if self.day_writer is not None:
            self.day_writer.close()
            rows = self.day_writer.rows
            self.days.append({"day": self.day, "impressions": rows, "ctr": self._clicks / max(rows, 1),
                              "cvr": self._buys / max(self._clicks, 1)})
            self.day_writer = None

    def sessions(self, keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Session ids and positions: a new session where the common_feature_index changes."""
        n = len(keys)
        change = np.ones(n, bool)
        if n > 1:
            change[1:] = np.asarray(pc.not_equal(keys.slice(1), keys.slice(0, n - 1)))
        change[0] = keys[0].as_py() != self.last_key
        idx = np.arange(n)
        run_start = np.maximum.accumulate(np.where(change, idx, -1))  # -1: the run goes on from the last batch
        pos = np.where(run_start >= 0, idx - run_start, self.position + idx)
        sid = self.session + np.cumsum(change)
        self.session, self.last_key, self.position = int(sid[-1]), keys[n - 1].as_py(), int(pos[-1]) + 1
        return sid, pos, run_start

    def session_time(self, run_start: np.ndarray, day: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's (day, ts) -> its session's: those of the session's first row (a list is shown at once)."""
        first = np.maximum(run_start, 0)
        day = np.where(run_start >= 0, day[first], self.session_day)
        ts = np.where(run_start >= 0, ts[first], self.session_ts)
        self.session_day, self.session_ts = int(day[-1]), float(ts[-1])
        return day, ts

    def write(self, cols: dict[str, np.ndarray]) -> None:
        self.day_writer.write(cols)
        self._clicks += int(cols["click"].sum())
        self._buys += int(cols["purchase"].sum())
        act = cols["click"]
        kind = np.where(cols["purchase"][act], K.KIND_ID["purchase"], K.KIND_ID["click"]).astype(np.int8)
        self.events.write({"user_id": cols["user_id"][act], "ts": cols["ts"][act], "item_id": cols["item_id"][act],
                           "kind": kind, "dwell": np.zeros(int(act.sum()), np.float32)})


def _skeleton(path: Path, days: tuple[int, int], common: dict, st: _State, chunk_bytes: int, bar) -> None:
    """Stream one skeleton file into the impressions of days[0]..days[1] (file order = time)."""
    n_rows, n_days = _count_rows(path), days[1] - days[0] + 1
    per_day = -(-n_rows // n_days)
    row = 0
    for batch in _csv(path, SKELETON, chunk_bytes):
        n = batch.num_rows
        keys = batch.column("common_feature_index").to_pylist()
        missing = [i for i, k in enumerate(keys) if k not in common]
        if missing:
            raise C.SourceError(f"{path}: row {row + missing[0] + 1}: common_feature_index {keys[missing[0]]!r} is not in "
                                "the common-features file")
        u = np.array([common[k] for k in keys], np.int64).reshape(n, len(USER_FIELDS))
        f = parse_fields(batch.column("feature_list"), ITEM_FIELDS, path, row)
        user = st.maps["user"].map(u[:, 0])
        for j, name in enumerate(("gender", "age", "activity"), start=1):
            st.user_feats[name].set_new(user, st.maps[name].map(u[:, j]))
        item = st.maps["item"].map(f["item"])
        for name in ("category", "shop", "brand"):
            st.item_feats[name].set_new(item, st.maps[name].map(f[name]))
        click, conv = batch.column("click").to_numpy(), batch.column("conversion").to_numpy()
        sid, pos, run_start = st.sessions(batch.column("common_feature_index"))
        idx = np.arange(row, row + n)
        day = days[0] + idx // per_day  # file order = time: per_day rows a day, evenly spaced
        ts = (day - 1) * C.DAY_SECONDS + (idx - (day - days[0]) * per_day) * (C.DAY_SECONDS / per_day)
        day, ts = st.session_time(run_start, day, ts.astype(np.float64))
        for d in np.unique(day):
            m = day == d
            if int(d) != st.day:
                st.open_day(int(d))
            st.write({"day": np.full(int(m.sum()), d, np.int16), "ts": ts[m], "user_id": user[m], "session_id": sid[m],
                      "position": pos[m], "item_id": item[m], "click": click[m] > 0, "purchase": conv[m] > 0})
        row += n
        if bar is not None:
            bar.update(n)
    st.close_day()


def import_aliccp(src: Path, out: Path, cfg: AliCCPConfig, *, bar=None, chunk_bytes: int = 64 << 20) -> dict:
    """Convert the Ali-CCP folder `src` into the data folder `out` (prepared). -> world.json's content."""
    files = {split: (src / f"sample_skeleton_{split}.csv", src / f"common_features_{split}.csv") for split in ("train", "test")}
    if not all(p.exists() for p in files["train"]):
        raise C.SourceError(f"{src}: needs sample_skeleton_train.csv and common_features_train.csv")
    test = all(p.exists() for p in files["test"])
    if cfg.n_days < (2 if test else 1):
        raise C.SourceError(f"--set n_days: must be >= {2 if test else 1} (train days, then the test file's day), got {cfg.n_days}")
    common: dict = {}
    for split in ("train", "test") if test else ("train",):
        common.update(_common(files[split][1], chunk_bytes, bar))
    st = _State(out)
    try:
        _skeleton(files["train"][0], (1, cfg.n_days - 1 if test else cfg.n_days), common, st, chunk_bytes, bar)
        if test:
            _skeleton(files["test"][0], (cfg.n_days, cfg.n_days), common, st, chunk_bytes, bar)
    except pa.ArrowInvalid as e:
        raise C.SourceError(f"{src}: {e}") from None
    finally:
        st.close_day()
        st.events.close()
    n_users, n_items = len(st.maps["user"]), len(st.maps["item"])
    C.write_users(out, st.maps["user"].external(),
                  {"age_bucket": st.user_feats["age"].array(n_users), "gender": st.user_feats["gender"].array(n_users),
                   "activity": st.user_feats["activity"].array(n_users)})
    C.write_items(out, st.maps["item"].external(), st.item_feats["category"].array(n_items),
                  st.item_feats["shop"].array(n_items), st.item_feats["brand"].array(n_items))
    counts = {"n_users": n_users, "n_items": n_items, "n_categories": len(st.maps["category"]),
              "n_shops": len(st.maps["shop"]), "n_brands": len(st.maps["brand"]), "n_age_buckets": len(st.maps["age"]),
              "n_genders": len(st.maps["gender"]), "n_activity_levels": len(st.maps["activity"])}
    source = {"format": "aliccp", "path": str(src), "test_file": test}
    return C.write_world(out, n_days=cfg.n_days, counts=counts, source=source, days=st.days, n_events=st.events.rows)
