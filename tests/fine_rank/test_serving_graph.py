"""The serving form of the fine ranker (fine_rank.serving_graph): folded BatchNorms and a
block-split input layer compute the trained Ranker's function, with the user given once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recstack import features as FE
from fine_rank.model import Ranker
from fine_rank.serving_graph import ServingRanker


def _trained_like(sequence: str) -> Ranker:
    """A Ranker with non-trivial BatchNorm statistics and head, as training leaves them."""
    vocab = FE.Vocab(n_users=30, n_items=40, n_categories=5, n_shops=6, n_brands=7, n_price_buckets=4,
                     n_age_buckets=2, n_genders=3, n_activity_levels=4, log_price_mean=3.0, log_price_std=1.0)
    torch.manual_seed(0)
    model = Ranker.build(vocab, emb_dim=4, hidden=(16, 8), sequence=sequence, attention_dim=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.head.linear.weight.normal_(std=0.5)
    return model.eval()


def _rows(n: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    user = np.stack([rng.integers(0, s, n) for s in (31, 3, 4, 5)], axis=1)
    item = np.stack([rng.integers(0, s, n) for s in (41, 6, 7, 8, 5)], axis=1)
    seq = np.stack([rng.integers(0, s, (n, FE.SEQ_LEN)) for s in (41, 6, 7, 8, 5)], axis=2)
    return {"user_feats": torch.from_numpy(user), "item_feats": torch.from_numpy(item),
            "item_dense": torch.from_numpy(rng.normal(size=(n, 1)).astype(np.float32)),
            "interacted": torch.from_numpy(rng.random((n, len(FE.INTERACTED_FIELDS))).astype(np.float32)),
            "seq_items": torch.from_numpy(seq), "seq_extras": torch.from_numpy(rng.random((n, FE.SEQ_LEN, 3)).astype(np.float32))}


@pytest.mark.parametrize("sequence", ["none", "din"])
def test_the_serving_ranker_computes_the_rankers_function(sequence):
    model = _trained_like(sequence)
    served = ServingRanker(model)
    x = _rows(64, np.random.default_rng(1))
    with torch.no_grad():
        np.testing.assert_allclose(served(**x).numpy(), model(**x).numpy(), rtol=0, atol=2e-6)
        # one request: one user row and one sequence row beside its candidates
        one = {**x, "user_feats": x["user_feats"][:1], "seq_items": x["seq_items"][:1], "seq_extras": x["seq_extras"][:1]}
        rep = {**one, "user_feats": x["user_feats"][:1].repeat(64, 1)}
        np.testing.assert_allclose(served(**one).numpy(), model(**rep).numpy(), rtol=0, atol=2e-6)


def test_folding_needs_a_model_in_eval_mode():
    model = _trained_like("none").train()
    with pytest.raises(ValueError, match="eval mode"):
        ServingRanker(model)
