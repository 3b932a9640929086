"""The shared training loop (recstack.training.loop) on a toy task: it runs `total` steps over
the stage's batches, logs the loss as the stage asks, and a run killed after step m and
resumed from its snapshot ends bit-identical to an uninterrupted one, in memory and streamed."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from recstack.training import checkpoint
from recstack.training.checkpoint import CheckpointError, TrainingState
from recstack.data import load
from recstack.data.shards import ShardStream
from recstack.training.loop import Ema, Loop, Recent, streamed_batches, training_state

N, BATCH, TOTAL = 40, 8, 13  # 5 batches per epoch: the run ends in its third epoch


class Killed(Exception):
    pass


@dataclass
class ToyConfig:
    lr: float = 0.05


def toy(seed: int = 0):
    """A linear regression: (model, x, y)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(N, generator=g)
    torch.manual_seed(seed)
    return nn.Linear(3, 1), x, y


def shuffled(gen: torch.Generator):
    """In-memory batches: each epoch a permutation from `gen`; the snapshot keeps it and the offset."""
    def epochs(resume):
        perm, first = (resume["perm"], resume["next"]) if resume is not None else (None, 0)
        while True:
            if perm is None:
                perm, first = torch.randperm(N, generator=gen), 0
            for start in range(first, N, BATCH):
                yield perm[start : start + BATCH], lambda: {"perm": perm, "next": start + BATCH}
            perm = None
    return epochs


def run(tmp_path, every: int = 0, resume: bool = False, losses=None) -> tuple[nn.Module, dict, list]:
    model, x, y = toy()
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / (2 * TOTAL))
    seen = []

    def step_loss(idx, step, total):
        seen.append((step, total, idx.tolist()))
        return nn.functional.mse_loss(model(x[idx]).squeeze(-1), y[idx])

    loop = Loop("toy", N, model, opt, TOTAL, losses or Recent(n=3), scheduler=sched,
                state=lambda: {"generator": gen.get_state()}, load_state=lambda r: gen.set_state(r["generator"]))
    with training_state(tmp_path, "toy", ToyConfig(), every, resume):
        stats = loop.run(step_loss, shuffled(gen))
    return model, stats, seen


def kill_at(monkeypatch, step: int) -> None:
    def hook(ph, s):
        if s == step:
            raise Killed
    monkeypatch.setattr(TrainingState, "on_step", hook)


def test_runs_total_steps_over_epochs_and_logs_the_recent_losses(tmp_path):
    _, stats, seen = run(tmp_path)
    assert stats["steps"] == TOTAL == len(seen)
    assert [s for s, _, _ in seen] == list(range(TOTAL)) and {t for _, t, _ in seen} == {TOTAL}
    first_epoch = sorted(i for _, _, idx in seen[:5] for i in idx)
    assert first_epoch == list(range(N))  # every row once per epoch
    assert math.isfinite(stats["loss"])


def test_killed_and_resumed_run_ends_where_an_uninterrupted_one_ends(tmp_path, monkeypatch):
    plain, plain_stats, plain_seen = run(tmp_path / "plain")
    kill_at(monkeypatch, 7)  # in the second epoch; the last snapshot is at step 6
    with pytest.raises(Killed):
        run(tmp_path / "run", every=3)
    snap = checkpoint.load(tmp_path / "run" / checkpoint.STATE_FILE, stage="toy")["current"]
    assert snap["step"] == 6 and snap["next"] == BATCH and len(snap["recent"]) == 3  # 1st batch of epoch 2
    assert list(snap) == ["index", "name", "n_rows", "step", "rng", "model", "optimizer", "scheduler", "generator",
                          "recent", "perm", "next"]
    monkeypatch.setattr(TrainingState, "on_step", None)
    resumed, stats, seen = run(tmp_path / "run", every=3, resume=True)
    assert seen == plain_seen[6:]  # the same batches, from the snapshot on
    assert stats == plain_stats
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), resumed.state_dict().values()))


def test_a_finished_phase_is_restored_not_trained_again(tmp_path):
    trained, stats, _ = run(tmp_path, every=100)
    again, again_stats, seen = run(tmp_path, every=100, resume=True)
    assert seen == [] and again_stats == stats
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))


def test_a_snapshot_of_the_other_kind_is_refused(tmp_path, monkeypatch):
    kill_at(monkeypatch, 4)
    with pytest.raises(Killed):
        run(tmp_path, every=2)
    monkeypatch.setattr(TrainingState, "on_step", None)
    model, x, y = toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loop = Loop("toy", N, model, opt, TOTAL, Recent(n=3), streamed=True)
    with training_state(tmp_path, "toy", ToyConfig(), 2, True):
        with pytest.raises(CheckpointError, match="toy: the snapshot was written by a in-memory run, this one is streamed"):
            loop.run(lambda *a: None, lambda r: iter(()))


def test_ema_keeps_its_arithmetic_and_start_value():
    nan_started = Ema("running", 0.95, 0.05, empty=math.nan)
    none_started = Ema("loss_ema", 0.98, 0.02)
    assert math.isnan(nan_started.state()) and none_started.state() is None and math.isnan(none_started.mean())
    for loss in (1.0, 0.5, 0.25):
        nan_started.add(loss)
        none_started.add(loss)
    assert nan_started.state() == 0.95 * (0.95 * 1.0 + 0.05 * 0.5) + 0.05 * 0.25
    assert none_started.state() == 0.98 * (0.98 * 1.0 + 0.02 * 0.5) + 0.02 * 0.25
    r = Recent(n=2)
    for loss in (1.0, 2.0, 4.0):
        r.add(loss)
    assert r.state() == [2.0, 4.0] and r.mean() == 3.0


def test_streamed_batches_resume_inside_a_chunk(tiny_data, tmp_path):
    """Streamed: the snapshot's stream position restarts the chunk and skips its done batches."""
    data = load(tiny_data)
    st = ShardStream(data, data.train_days, chunk_rows=1000, seed=0, clicked_only=False)

    def chunk_batches(chunk, skip):
        for k in range(skip, len(chunk) // 250):
            yield k + 1, chunk.imps["item_id"][k * 250 : (k + 1) * 250]

    def batches(resume):
        return streamed_batches(st, 2, resume, chunk_batches, lambda epoch: {"epoch": epoch})

    full = [(b.copy(), pos()) for b, pos in batches(None)]
    full_chunks, last = divmod(st.rows_per_rank, 1000)
    assert len(full) == 2 * (full_chunks * 4 + last // 250)  # full batches of every chunk, 2 epochs
    at = 9  # resume after the 9th batch: from its snapshot's position
    rest = [(b, pos()) for b, pos in batches(full[at - 1][1])]
    assert len(rest) == len(full) - at
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(full[at:], rest))
    assert full[0][1]["epoch"] == 0 and full[-1][1]["epoch"] == 1


@pytest.mark.parametrize("stage", ["retrieval", "coarse_rank", "fine_rank"])
def test_export_imports_no_training_code(stage):
    """A stage's export rebuilds its model from config and model modules: importing it loads
    neither the stage's train.py nor the training loop."""
    import subprocess
    import sys

    code = (f"import sys, {stage}.export; "
            f"print(sorted(m for m in sys.modules if m in ('{stage}.train', '{stage}.tasks') "
            f"or m == 'recstack.training.loop'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
