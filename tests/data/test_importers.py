"""`recstack import`: small files in the exact source formats (Taobao UserBehavior CSV, the
Ali-CCP skeleton / common-features CSVs) -> a valid data folder -> train -> export -> serve."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recstack.cli import main
from recstack.data import contract as K
from recstack.data.importers import SourceError, run_import
from recstack.data.importers.common import IdMap
from recstack.data.validate import validate

TAOBAO_START = 1511539200  # 2017-11-25 00:00 China time, the importer's default day 1


def write_user_behavior(path: Path, seed: int = 0, n_users: int = 150, n_items: int = 600, n_days: int = 4) -> dict:
    """A UserBehavior.csv: sparse raw ids, sessions of pvs within a category, some followed by
    fav / cart / buy of the same item; rows in the dataset's order (by user, then time).
    -> counts for the checks."""
    rng = np.random.default_rng(seed)
    users = rng.choice(10**9, n_users, replace=False) + 10**6
    items = rng.choice(5 * 10**9, n_items, replace=False) + 10**6
    cats = rng.choice(10**7, 12, replace=False)
    item_cat = cats[rng.integers(0, len(cats), n_items)]
    popular = np.argsort(rng.random(n_items))
    rows, buys_after_pv = [], 0
    for u in users:
        t = TAOBAO_START + rng.integers(0, 3600)
        while t < TAOBAO_START + n_days * 86400:
            i = popular[min(int(rng.pareto(1.2) * 40), n_items - 1)]
            rows.append((u, items[i], item_cat[i], "pv", t))
            r = rng.random()
            if r < 0.15:
                kind = "buy" if r < 0.06 else ("cart" if r < 0.1 else "fav")
                later = min(t + int(rng.integers(5, 600)), TAOBAO_START + n_days * 86400 - 1)
                rows.append((u, items[i], item_cat[i], kind, later))
                buys_after_pv += kind == "buy"
            t += int(rng.exponential(4 * 3600))
    rows.append((users[0], items[0], item_cat[0], "pv", TAOBAO_START - 100))  # outside the days: dropped
    rows.sort(key=lambda r: (r[0], r[4]))
    path.write_text("".join(f"{u},{i},{c},{b},{t}\n" for u, i, c, b, t in rows))
    return {"rows": len(rows), "pv": sum(r[3] == "pv" for r in rows) - 1, "buys_after_pv": buys_after_pv,
            "users": users, "items": items}


def _features(pairs) -> str:
    return "\x01".join(f"{field}\x02{fid}\x03{value}" for field, fid, value in pairs)


def write_aliccp(folder: Path, seed: int = 0, n_users: int = 120, n_items: int = 500) -> dict:
    """sample_skeleton_{train,test}.csv + common_features_{train,test}.csv: requests of 3..8
    impressions, user fields in the common features, item fields in the skeleton (brand
    missing on some), extra fields the importer ignores. -> counts for the checks."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    users = rng.choice(10**8, n_users, replace=False)
    items = rng.choice(10**9, n_items, replace=False)
    cat = rng.integers(10**6, 10**6 + 15, n_items)
    counts = {"train": 0, "test": 0, "clicks": 0, "purchases": 0}
    sample_id = 0
    for split, n_requests in (("train", 500), ("test", 150)):
        common, skeleton = [], []
        for r in range(n_requests):
            key = hashlib.md5(f"{split}-{r}".encode()).hexdigest()
            u = int(users[rng.integers(n_users)])
            pairs = [("101", u, 1.0), ("121", int(rng.integers(90)), 1.0), ("124", u % 2 + 1, 1.0),
                     ("125", u % 7 + 1, 1.0), ("126", u % 3 + 1, 1.0), ("109_14", int(rng.integers(10**6)), 0.69315)]
            common.append(f"{key},{len(pairs)},{_features(pairs)}")
            for _ in range(int(rng.integers(3, 9))):
                i = min(int(rng.pareto(1.1) * 30), n_items - 1)
                click = int(rng.random() < 0.12)
                buy = int(click and rng.random() < 0.25)
                p = [("205", int(items[i]), 1.0), ("206", int(cat[i]), 1.0), ("207", int(items[i]) % 40 + 9, 1.0),
                     ("508", int(rng.integers(10**5)), 1.0), ("301", 1 + int(rng.integers(3)), 1.0)]
                if i % 4:
                    p.append(("216", int(items[i]) % 25 + 2, 1.0))
                skeleton.append(f"{sample_id},{click},{buy},{key},{len(p)},{_features(p)}")
                sample_id += 1
                counts[split] += 1
                counts["clicks"] += click
                counts["purchases"] += buy
        (folder / f"common_features_{split}.csv").write_text("\n".join(common) + "\n")
        (folder / f"sample_skeleton_{split}.csv").write_text("\n".join(skeleton) + "\n")
    return counts


def test_id_map_is_dense_in_first_appearance_order():
    m = IdMap()
    assert m.map(np.array([900, 5, 900, 10**15])).tolist() == [0, 1, 0, 2]
    assert m.map(np.array([7, 5, 10**15, 3])).tolist() == [3, 1, 2, 4]
    assert m.external().tolist() == [900, 5, 10**15, 7, 3] and len(m) == 5


def test_taobao_import_trains_exports_and_serves(tmp_path, train_export_serve):
    src = tmp_path / "UserBehavior.csv"
    counts = write_user_behavior(src)
    out = tmp_path / "taobao"
    # a small CSV block forces several streamed blocks through every step
    summary = run_import("taobao", src, out, progress=False, chunk_bytes=16 << 10, overrides=("n_days=4",))
    assert "4 days" in summary and "objective value column: one" in summary
    assert [p.line() for p in validate(out)] == []
    world = json.loads((out / "world.json").read_text())
    assert world["source"]["dropped_outside_days"] == 1 and world["objective_value"] == "one"
    events = pq.read_table(out / "events.parquet").to_pydict()
    assert len(events["kind"]) == counts["rows"] - 1
    assert set(events["kind"]) <= {K.KIND_ID[k] for k in ("click", "purchase", "favourite", "cart")}
    users = pq.read_table(out / "users.parquet").to_pydict()
    assert sorted(users["external_id"]) == sorted(counts["users"].tolist()) and users["user_id"] == list(range(len(users["user_id"])))

    imps = [pq.read_table(out / f"impressions/day={d:02d}.parquet").to_pydict() for d in range(1, 5)]
    clicks = sum(sum(t["click"]) for t in imps)
    assert clicks == counts["pv"]  # one clicked impression per pv inside the days
    # purchases: every buy in the generator follows its pv within minutes (the same day but at
    # a day's end), so the attribution finds nearly all of them
    purchases = sum(sum(t["purchase"]) for t in imps)
    assert 0.9 * counts["buys_after_pv"] <= purchases <= counts["buys_after_pv"]
    for t in imps:  # each list: one click and up to 4 sampled negatives of the clicked item's category
        sessions = np.asarray(t["session_id"])
        per = np.bincount(sessions - sessions.min())
        assert per[per > 0].max() == 5 and np.asarray(t["click"])[np.asarray(t["purchase"])].all()
    items = pq.read_table(out / "items.parquet").to_pydict()
    cat = np.asarray(items["category"])
    t = imps[1]
    first = {s: i for s, i, c in zip(t["session_id"], t["item_id"], t["click"]) if c}
    assert all(cat[i] == cat[first[s]] for s, i in zip(t["session_id"], t["item_id"]))

    manifest, resp = train_export_serve(out, tmp_path / "work", user_id=2, k=5)
    assert manifest["objective"]["value_column"] == "one"
    assert len(resp.items) == 5 and all(it.score == pytest.approx(it.pctr * it.pcvr, rel=1e-6) for it in resp.items)


def test_aliccp_import_trains_exports_and_serves(tmp_path, train_export_serve):
    src = tmp_path / "ali-ccp"
    counts = write_aliccp(src)
    out = tmp_path / "aliccp"
    summary = run_import("aliccp", src, out, progress=False, chunk_bytes=16 << 10)
    assert "3 days" in summary and f"{counts['train'] + counts['test']} impressions" in summary
    assert [p.line() for p in validate(out)] == []
    imps = [pq.read_table(out / f"impressions/day={d:02d}.parquet").to_pydict() for d in (1, 2, 3)]
    assert len(imps[2]["item_id"]) == counts["test"]  # the test file is the last day
    assert sum(sum(t["click"]) for t in imps) == counts["clicks"] and sum(sum(t["purchase"]) for t in imps) == counts["purchases"]
    events = pq.read_table(out / "events.parquet").to_pydict()
    assert len(events["kind"]) == counts["clicks"] and sum(events["kind"]) == counts["purchases"]  # purchase = 1
    t = imps[0]  # a request is a session, shown at one time, positions 0..n-1
    sessions, ts, pos = (np.asarray(t[k]) for k in ("session_id", "ts", "position"))
    starts = np.flatnonzero(np.diff(np.concatenate([[-1], sessions])) != 0)
    assert (pos[starts] == 0).all() and all(len(set(ts[sessions == s])) == 1 for s in sessions[starts[:20]])
    items = pq.read_table(out / "items.parquet").to_pydict()
    world = json.loads((out / "world.json").read_text())
    assert world["vocab"]["n_brands"] == len(set(items["brand"])) and world["vocab"]["n_genders"] == 2

    manifest, resp = train_export_serve(out, tmp_path / "work", user_id=1, k=5)
    assert manifest["objective"]["value_column"] == "one" and len(resp.items) == 5


def test_import_errors_name_the_file_row_and_reason(tmp_path, capsys):
    bad = tmp_path / "UserBehavior.csv"
    bad.write_text(f"1,2,3,pv,{TAOBAO_START + 10}\n1,2,3,click,{TAOBAO_START + 20}\n")
    with pytest.raises(SourceError, match=r"row 2: behavior_type 'click' is not one of pv, buy, fav, cart"):
        run_import("taobao", bad, tmp_path / "out1", progress=False)
    src = tmp_path / "ali"
    write_aliccp(src)
    skeleton = src / "sample_skeleton_train.csv"
    lines = skeleton.read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ",205:77"
    skeleton.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"sample_skeleton_train.csv: row 5: feature '205:77' is not field"):
        run_import("aliccp", src, tmp_path / "out2", progress=False)
    # through the CLI: one line, status 2; a non-empty --out needs --force
    assert main(["import", "taobao", str(bad), "--out", str(tmp_path / "out1"), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["import", "taobao", str(bad), "--out", str(tmp_path / "out3"), "--quiet", "--set", "nope=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err
