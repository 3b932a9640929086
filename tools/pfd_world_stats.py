"""How privileged the interacted and post-event features of a simulated world are.

    python tools/pfd_world_stats.py DATA_DIR [DATA_DIR ...]

Per world, on the test day: the share of impressions with a non-zero count of each
interacted field, from the full event log (what training uses) and from the 50-slot
sequence (what the student encodes), and each field's AUC for the click; on the clicked
training / test impressions: the AUC for the purchase of a logistic regression on the four
post-event features alone (how near a post-event teacher is to the label).
"""
from __future__ import annotations

import json
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression

from recstack import features as FE
from recstack.data import load
from recstack.evaluation import metrics as M


def world_stats(root: str) -> dict:
    d = load(root)
    ex = d.examples(d.test_day)
    rows = np.arange(len(ex))
    b = ex.batch(rows)
    seq = FE.interacted_features(b["seq_items"], b["seq_extras"], b["item_feats"])
    fields = {}
    for j, name in enumerate(FE.INTERACTED_FIELDS[: b["interacted"].shape[1]]):
        fields[name] = {"nonzero_log": round(float((b["interacted"][:, j] > 0).mean()), 4),
                        "nonzero_sequence": round(float((seq[:, j] > 0).mean()), 4),
                        "click_auc_log": round(M.auc(b["click"], b["interacted"][:, j]), 4)}
    tr = d.examples(d.train_days, clicked_only=True)
    te = d.examples(d.test_day, clicked_only=True)
    btr, bte = tr.batch(np.arange(len(tr))), te.batch(np.arange(len(te)))
    lr = LogisticRegression(max_iter=1000).fit(btr["post_event"], btr["purchase"])
    post_auc = M.auc(bte["purchase"], lr.decision_function(bte["post_event"]))
    ev_kinds = np.bincount(d._events["kind"], minlength=len(FE.EVENT_KINDS))
    return {"data": root, "events_by_kind": dict(zip(FE.EVENT_KINDS, ev_kinds.tolist())),
            "test_impressions": len(ex), "ceiling_ctr_auc": round(M.auc(b["click"], b["true_pctr"]), 4),
            "post_event_only_purchase_auc": round(post_auc, 4),
            "true_pcvr_purchase_auc": round(M.auc(bte["purchase"], bte["true_pcvr"]), 4), "interacted": fields}


if __name__ == "__main__":
    print(json.dumps([world_stats(r) for r in sys.argv[1:]], indent=1))
