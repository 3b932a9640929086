"""Sparse embedding gradients: the optimisers that take them are the dense methods on the rows
a batch touches (recstack.training.sparse)."""
import copy

import pytest
import torch
from torch import nn

from recstack.config import ConfigError
from recstack.training import sparse


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(30, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 1))


def _batches(all_rows: bool, n: int = 15):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        ids = torch.randint(0, 30, (8, 3), generator=g)
        if all_rows:  # every row of the table appears in every batch
            ids = torch.cat([torch.arange(30).reshape(10, 3), ids])
        else:  # rows 20..29 never appear
            ids = ids % 20
        yield ids


def _train(model, opt, all_rows: bool) -> None:
    for ids in _batches(all_rows):
        opt.zero_grad(set_to_none=True)
        model(ids).sin().pow(2).mean().backward()
        opt.step()


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_lazy_adam_is_adam_on_dense_gradients():
    a, b = _model(), _model()
    _train(a, torch.optim.Adam(a.parameters(), lr=1e-2), all_rows=False)
    _train(b, sparse.LazyAdam(b.parameters(), lr=1e-2), all_rows=False)
    assert _max_diff(a, b) < 1e-6


def test_lazy_adam_is_adam_when_every_row_is_in_every_batch():
    a, b = _model(), _model()
    assert sparse.enable(b) == 1
    _train(a, torch.optim.Adam(a.parameters(), lr=1e-2), all_rows=True)
    _train(b, sparse.optimizer("adam", b.parameters(), lr=1e-2), all_rows=True)
    assert b[0].weight.grad.is_sparse
    assert _max_diff(a, b) < 1e-6


def test_lazy_adam_leaves_untouched_rows_alone():
    dense, lazy = _model(), _model()
    start = lazy[0].weight.detach().clone()
    sparse.enable(lazy)
    _train(dense, torch.optim.Adam(dense.parameters(), lr=1e-2), all_rows=False)
    _train(lazy, sparse.optimizer("adamw", lazy.parameters(), lr=1e-2), all_rows=False)
    assert torch.equal(lazy[0].weight[20:], start[20:])
    assert not torch.equal(lazy[0].weight[1:20], start[1:20])
    # rows that every batch may touch moved, as under dense Adam, but not identically (lazy moments)
    assert (dense[0].weight[1:20] - start[1:20]).abs().max() > 0


def test_sparse_adagrad_is_dense_adagrad():
    a, b = _model(), _model()
    sparse.enable(b)
    _train(a, torch.optim.Adagrad(a.parameters(), lr=0.05), all_rows=False)
    _train(b, sparse.optimizer("adagrad", b.parameters(), lr=0.05), all_rows=False)
    assert _max_diff(a, b) < 1e-6


def test_state_dict_round_trip_continues_identically():
    a, b = _model(), _model()
    for m in (a, b):
        sparse.enable(m)
    oa = sparse.optimizer("adam", a.parameters(), lr=1e-2)
    _train(a, oa, all_rows=False)
    b.load_state_dict(a.state_dict())
    ob = sparse.optimizer("adam", b.parameters(), lr=1e-2)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # a saved file, not oa's live tensors
    _train(a, oa, all_rows=False)
    _train(b, ob, all_rows=False)
    assert _max_diff(a, b) == 0.0


@pytest.mark.parametrize("kind, wd, match", [("adam", 0.01, "weight_decay = 0"), ("sgd", 0.0, "optimizer must be one of")])
def test_refused_settings_say_why(kind, wd, match):
    with pytest.raises(ConfigError, match=match):
        sparse.optimizer(kind, _model().parameters(), lr=1e-2, weight_decay=wd)


@pytest.mark.parametrize("stage", ["retrieval", "coarse", "fine"])
def test_every_stage_trains_with_sparse_tables(stage, tiny_data, tmp_path):
    """Each stage's optimiser takes the sparse gradients and its checkpoint holds dense tables."""
    import importlib

    mod = importlib.import_module(f"{'coarse_rank' if stage == 'coarse' else 'fine_rank' if stage == 'fine' else 'retrieval'}.train")
    small = {"retrieval": dict(max_steps=6, epochs=1),
             "coarse": dict(max_steps=6, eval_max_rows=200, teacher="pfd_md", objective="gmv"),
             "fine": dict(ctr_max_steps=4, cvr_max_steps=3)}[stage]
    cfg = mod.Config(sparse_embeddings=True, **small)
    metrics = mod.train(cfg, tiny_data, tmp_path, progress=False)
    assert metrics
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    tables = [v for k, v in _tensors(ckpt) if k.endswith("weight") and v.dim() == 2]
    assert tables and not any(t.is_sparse for t in tables)
    assert all(torch.isfinite(t).all() for t in tables)


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
