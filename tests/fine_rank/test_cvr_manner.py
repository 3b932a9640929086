"""PFD Table 8's training manners for the CVR teacher: Share&Sync (the teacher reads the
student's embeddings), Ind&Sync (embeddings of its own, trained alongside) and Ind&Async
(its own embeddings, trained first, then frozen)."""
from __future__ import annotations

import pytest
import torch

import fine_rank.train as ftrain
from fine_rank.model import Ranker, build_teacher
from recstack.config import ConfigError, apply_overrides
from recstack.data import load

CFG = dict(cvr_hidden=(32, 16), cvr_emb_dim=4, cvr_batch_size=128, cvr_md_hidden=(32, 16), cvr_max_steps=12)


@pytest.fixture(scope="module")
def clicked(tiny_data):
    data = load(tiny_data)
    return data.vocab, ftrain.clicked(ftrain.materialise(data.examples(data.fit_days)))


def fit(vocab, rows, *overrides: str) -> ftrain.TaskResult:
    return ftrain.fit_task("cvr", apply_overrides(ftrain.Config(**CFG), list(overrides)), vocab, rows, seed=2)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return all(torch.equal(x[k], y[k]) for k in x)


def test_a_teacher_reads_the_embeddings_it_is_given(fine_vocab):
    student, other = Ranker.build(fine_vocab, emb_dim=4, hidden=(16, 8)), Ranker.build(fine_vocab, emb_dim=4, hidden=(16, 8))
    assert build_teacher("pfd_md", student, (16, 8), (32, 16)).embeddings is student.embeddings
    own = build_teacher("pfd_md", student, (16, 8), (32, 16), inputs=other)
    assert own.embeddings is other.embeddings and own.embeddings is not student.embeddings


def test_ind_manners_leave_the_student_alone_at_lambda_0_and_share_does_not(clicked):
    """With λ = 0 the student learns from y only: under Ind its inputs are its own, so it is the
    baseline bit for bit (the teacher's loss reaches none of its parameters); under Share the
    teacher's log-loss also trains the embeddings the student reads."""
    vocab, rows = clicked
    base = fit(vocab, rows)
    for manner in ("ind_sync", "ind_async"):
        r = fit(vocab, rows, "cvr_teacher=pfd_md", f"cvr_manner={manner}", "distill_lambda=0")
        assert same(r.model, base.model), manner
        assert r.stats["manner"] == manner and "teacher" in r.extras
    shared = fit(vocab, rows, "cvr_teacher=pfd_md", "distill_lambda=0")
    assert not same(shared.model, base.model) and shared.stats["manner"] == "share_sync"


def test_ind_async_trains_the_teacher_first_and_freezes_it(clicked):
    """Ind&Async: the teacher is trained before the student, so λ does not change it; the
    student does learn from it (λ 0.5 moves the student) with no warm-up."""
    vocab, rows = clicked
    zero, half = (fit(vocab, rows, "cvr_teacher=pfd", "cvr_manner=ind_async", f"distill_lambda={lam}") for lam in (0, 0.5))
    t0, t1 = (r.extras["teacher"](rows) for r in (zero, half))
    assert (t0 == t1).all()
    assert not same(zero.model, half.model)
    assert half.stats["teacher_steps"] == half.stats["steps"] > 0 and half.stats["swap_step"] == 0
    # Ind&Sync trains the same teacher alongside (nothing of the student reaches it, as in the
    # paper's Table 8, where both manners' teachers score alike), while the student learns
    # from its soft labels as they form: the same teacher, another student
    sync = fit(vocab, rows, "cvr_teacher=pfd", "cvr_manner=ind_sync")
    assert (sync.extras["teacher"](rows) == t1).all()
    assert not same(sync.model, half.model)


def test_manner_validation():
    with pytest.raises(ConfigError, match="cvr_manner must be one of"):
        ftrain.Config(cvr_teacher="pfd", cvr_manner="async")
    with pytest.raises(ConfigError, match="reads the regular inputs"):
        ftrain.Config(cvr_teacher="lupi", cvr_manner="ind_sync")
    with pytest.raises(ConfigError, match="reads the regular inputs"):
        ftrain.Config(cvr_manner="ind_async")  # no teacher
    assert ftrain.Config(cvr_teacher="md", cvr_manner="ind_async").cvr_manner == "ind_async"


def test_the_fit_cache_keys_a_manner_only_when_it_is_not_the_default(tiny_data):
    """Fits cached before the manner existed (all Share&Sync) keep their keys."""
    from fine_rank.experiments import runs
    from fine_rank.experiments.plan import CVR_METHODS

    tables = runs.load_tables(tiny_data)
    rows = {m.name: m for m in CVR_METHODS}
    key = lambda m, *extra: runs.fit_key(tables, rows[m], ftrain.Config(), "test", 0.002, 1, 1.0, extra)  # noqa: E731
    assert key("pfd_md", "cvr_manner=share_sync") == key("pfd_md")
    assert len({key("pfd_md"), key("pfd_md_ind_sync"), key("pfd_md_ind_async")}) == 3
