"""The full behaviour log (views, favourites, carts), the taste-following hidden state and the
propensity-driven post-event features."""
import numpy as np
import pyarrow.parquet as pq

from recstack import data as D
from recstack import features as FE
from recstack.config import apply_overrides
from recstack.evaluation import metrics as M
from recstack.world import preset, simulate


def test_the_log_holds_every_kind_and_the_sequence_only_clicks_and_purchases(tiny_data):
    ev = pq.read_table(f"{tiny_data}/events.parquet").to_pydict()
    kinds = np.bincount(np.array(ev["kind"]), minlength=len(FE.EVENT_KINDS))
    assert (kinds > 0).all() and kinds[FE.EVENT_KINDS.index("view")] > kinds[FE.EVENT_KINDS.index("click")]
    user, ts = np.array(ev["user_id"]), np.array(ev["ts"])
    assert (np.diff(user) >= 0).all() and (np.diff(ts)[np.diff(user) == 0] >= 0).all()  # sorted by (user, ts)
    d = D.load(tiny_data)
    assert set(np.unique(d.behaviours.kind)) == {FE.BEHAVIOUR_CLICK, FE.BEHAVIOUR_PURCHASE}
    ex = d.examples(d.test_day)
    b = ex.batch(np.arange(len(ex)))
    full = (b["interacted"] > 0).mean(0)
    seq = (FE.interacted_features(b["seq_items"], b["seq_extras"], b["item_feats"]) > 0).mean(0)
    j = FE.INTERACTED_FIELDS.index("behaviours_same_category_24h")
    assert full[j] > 2 * seq[j]  # the log reaches far beyond the 50 slots the student encodes


def test_taste_shares_tie_intents_and_favourites_to_taste(tmp_path):
    base = apply_overrides(preset("tiny"), ["history_days=1"])
    runs = {}
    for share in (0.0, 1.0):
        cfg = apply_overrides(base, [f"intent_taste_share={share}", f"favourite_taste_share={share}"])
        simulate(cfg, 3, tmp_path / str(share), progress=False)
        tu = pq.read_table(tmp_path / str(share) / "truth_users.parquet").to_pydict()
        ti = pq.read_table(tmp_path / str(share) / "truth_intents.parquet").to_pydict()
        habit = np.array(tu["habit_categories"])
        intents = np.array(ti["category"])
        users = np.array(ti["user_id"])
        runs[share] = (habit[users] == intents[:, None]).any(1).mean()
    assert runs[1.0] == 1.0 and runs[0.0] < 0.5, runs


def test_post_event_features_follow_the_propensity(tmp_path):
    base = apply_overrides(preset("tiny"), ["history_days=1"])
    aucs = {}
    for a in (0.0, 1.0):
        simulate(apply_overrides(base, [f"post_event_propensity={a}"]), 5, tmp_path / str(a), progress=False)
        d = D.load(tmp_path / str(a))
        ex = d.examples(d.train_days, clicked_only=True)
        b = ex.batch(np.arange(len(ex)))
        aucs[a] = M.auc(b["purchase"], b["post_event"][:, 0] + b["post_event"][:, 3])
    # on the label alone a dwell-and-cart teacher is near the label; on the propensity it is not
    assert aucs[0.0] > aucs[1.0] + 0.05, aucs
    assert aucs[1.0] > 0.55, aucs  # the propensity still predicts the purchase


def test_without_the_price_penalty_dear_items_are_looked_at_longer(tmp_path):
    # post_event_price_penalty=0: the page shows the wish to buy without the price's pull on it,
    # and deliberation lengthens it, so dwell rises with price while purchases still fall
    base = apply_overrides(preset("tiny"), ["history_days=1", "post_event_propensity=1"])
    corr = {}
    for pen in (0.0, 1.0):
        simulate(apply_overrides(base, [f"post_event_price_penalty={pen}"]), 5, tmp_path / str(pen), progress=False)
        imps = pq.read_table(tmp_path / str(pen) / "impressions").to_pydict()
        price = dict(zip(*pq.read_table(tmp_path / str(pen) / "items.parquet", columns=["item_id", "price"]).to_pydict().values()))
        clicked = np.array(imps["click"])
        lp = np.log([price[i] for i in np.array(imps["item_id"])[clicked]])
        dwell = np.log(np.array(imps["dwell"])[clicked])
        bought = np.array(imps["purchase"])[clicked]
        corr[pen] = (np.corrcoef(dwell, lp)[0, 1], np.corrcoef(bought, lp)[0, 1])
    assert corr[0.0][0] > corr[1.0][0] + 0.2 and corr[0.0][0] > 0.2, corr
    assert corr[0.0][1] < 0 and corr[1.0][1] < 0, corr  # the purchase falls with price either way
