"""Streaming mode of the training loop (recstack.training.loop.Stream): one pass per day, the
model and the optimiser state carried from day to day, each day's model scored on the next
day, and a run killed mid-stream resumes bit-identical (a finished day restores its optimiser
state with its model)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from recstack.training import checkpoint
from recstack.training.checkpoint import CheckpointError, TrainingState
from recstack.training.loop import Loop, Recent, Stream, training_state

DAYS, ROWS, BATCH = (1, 2, 3, 4), 24, 8  # 3 steps per day


@dataclass
class StreamConfig:
    """The toy stream's config, saved in its training state as a stage's would be."""
    lr: float = 0.05


def day_data():
    g = torch.Generator().manual_seed(0)
    out = {}
    for d in DAYS:
        x = torch.randn(ROWS, 3, generator=g)
        out[d] = (x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.05 * d)  # the target drifts by day
    return out


def run_stream(tmp_path, every: int = 0, resume: bool = False):
    data = day_data()
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    stream = Stream(days=DAYS)
    made = []
    seen = []

    def make():
        made.append(1)
        return torch.optim.Adam(model.parameters(), lr=0.05)

    def train_day(d):
        opt = stream.optimizer(make)
        x, y = data[d]

        def batches(resume_at):
            first = resume_at["next"] if resume_at is not None else 0
            for start in range(first, ROWS, BATCH):
                yield torch.arange(start, start + BATCH), lambda s=start: {"next": s + BATCH}

        def step_loss(idx, step, total):
            seen.append((d, step))
            return nn.functional.mse_loss(model(x[idx]).squeeze(-1), y[idx])

        loop = Loop(stream.phase_name("toy"), ROWS, model, opt, ROWS // BATCH, Recent(n=3), carry_optimizer=True)
        return loop.run(step_loss, batches)

    def score(d):
        x, y = data[d]
        with torch.no_grad():
            return {"mse": float(nn.functional.mse_loss(model(x).squeeze(-1), y))}

    with training_state(tmp_path, "toy", StreamConfig(), every, resume):
        curve = stream.run(train_day, score)
    return model, curve, seen, made, stream


def test_one_pass_per_day_one_optimiser_scored_on_the_next_day(tmp_path):
    model, curve, seen, made, stream = run_stream(tmp_path)
    assert [(c["day"], c["eval_day"]) for c in curve] == [(1, 2), (2, 3), (3, 4)]
    assert seen == [(d, s) for d in DAYS[:-1] for s in range(3)]  # each day once, its own step count
    assert made == [1]  # one optimiser for the whole stream
    opt = stream.optimizer(lambda: None)
    assert all(int(st["step"]) == 9 for st in opt.state.values())  # Adam's moments carried over 3 days
    assert all(c["train"]["steps"] == 3 for c in curve)
    assert stream.warm and stream.day == 3


def test_a_stream_killed_mid_day_resumes_bit_identical(tmp_path, monkeypatch, kill_at):
    plain, plain_curve, _, _, plain_stream = run_stream(tmp_path / "plain")
    state = {"n": 0}

    def hook(ph, s):  # the 5th step overall: day 2, step 2 (day 1 finished; a snapshot every step)
        state["n"] += 1
        if state["n"] == 5:
            raise kill_at.Killed
    monkeypatch.setattr(TrainingState, "on_step", hook)
    with pytest.raises(kill_at.Killed):
        run_stream(tmp_path / "run", every=1)
    monkeypatch.setattr(TrainingState, "on_step", None)
    saved = checkpoint.load(tmp_path / "run" / checkpoint.STATE_FILE, stage="toy")
    assert [d["name"] for d in saved["done"]] == ["toy@day1"] and "optimizer" in saved["done"][0]
    resumed, curve, seen, _, stream = run_stream(tmp_path / "run", every=1, resume=True)
    assert seen[0] == (2, 2) and len(seen) == 4  # day 1 restored, day 2 from its snapshot, day 3
    assert [c["mse"] for c in curve] == [c["mse"] for c in plain_curve]
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), resumed.state_dict().values()))
    a, b = plain_stream.optimizer(lambda: None).state_dict(), stream.optimizer(lambda: None).state_dict()
    assert all(torch.equal(a["state"][k]["exp_avg"], b["state"][k]["exp_avg"]) for k in a["state"])


def test_a_finished_day_without_optimizer_state_is_refused(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with training_state(tmp_path, "toy", StreamConfig(), 1, False):  # a finished phase written without carry
        Loop("toy@day1", ROWS, model, opt, 1, Recent()).run(
            lambda idx, s, t: model(torch.ones(2, 3)).sum(), lambda r: iter([(None, lambda: {})]))
    with training_state(tmp_path, "toy", StreamConfig(), 1, True):
        with pytest.raises(CheckpointError, match="toy@day1: the finished phase has no optimizer state"):
            Loop("toy@day1", ROWS, model, opt, 1, Recent(), carry_optimizer=True).run(lambda *a: None, lambda r: iter(()))


@pytest.mark.parametrize("days", [(1,), (2, 1), (1, 1, 2)])
def test_stream_days_must_be_increasing_and_at_least_two(days):
    with pytest.raises(ValueError, match="Stream.days must be >= 2 increasing days"):
        Stream(days=days)
