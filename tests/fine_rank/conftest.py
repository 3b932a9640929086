"""What the fine-ranker test modules share: a small vocabulary, random model inputs over it and
the tiny-world training settings."""
from __future__ import annotations

from types import MappingProxyType

import pytest
import torch

from recstack import features as FE
from recstack.features import Vocab

VOCAB = Vocab(n_users=50, n_items=80, n_categories=6, n_shops=9, n_brands=7, n_price_buckets=5,
              n_age_buckets=4, n_genders=2, n_activity_levels=3, log_price_mean=3.0, log_price_std=1.0)
# enough steps on tiny for a converged, calibrated model, still ~2 s
TINY_CFG = dict(ctr_batch_size=256, ctr_epochs=2, cvr_batch_size=128)


def _random_inputs(b: int, vocab: Vocab = VOCAB, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    user = torch.stack([torch.randint(0, n, (b,), generator=g) for n in vocab.user_sizes()], dim=1)
    item = torch.stack([torch.randint(0, n, (b,), generator=g) for n in vocab.item_sizes()], dim=1)
    return {
        "user_feats": user,
        "item_feats": item,
        "item_dense": torch.randn(b, 1, generator=g),
        "interacted": torch.log1p(torch.randint(0, 5, (b, len(FE.INTERACTED_FIELDS)), generator=g).float()),
    }


@pytest.fixture(scope="session")
def fine_vocab() -> Vocab:
    """A vocabulary of 50 users and 80 items, for models built without a world."""
    return VOCAB


@pytest.fixture(scope="session")
def random_inputs():
    """Callable (b, vocab=fine_vocab, seed=0) -> a batch of b random model inputs."""
    return _random_inputs


@pytest.fixture(scope="session")
def tiny_fine_cfg() -> MappingProxyType:
    """fine_rank.train.Config settings that train a converged, calibrated model on `tiny` (read-only)."""
    return MappingProxyType(TINY_CFG)
