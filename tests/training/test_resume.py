"""Resumable training: a run killed after step m and resumed with `resume=True` ends
bit-identical (CPU, one process) to an uninterrupted run and loses at most
`checkpoint_every` steps; a checkpoint that does not fit the run is refused."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import coarse_rank.train as C
import fine_rank.train as FT
import retrieval.train as R
from recstack.training import checkpoint
from recstack.training.checkpoint import CheckpointError, TrainingState

REPO = Path(__file__).resolve().parents[2]

FINE = dict(ctr_hidden=(32, 16), cvr_hidden=(32, 16), ctr_batch_size=256, ctr_epochs=2, cvr_batch_size=128,
            cvr_teacher="pfd", cvr_md_hidden=(32, 16))
COARSE = dict(embed_dim=8, d_model=16, n_heads=2, ff_dim=32, hidden=(32,), out_dim=16, batch_size=256, epochs=2,
              max_steps=30, warmup_steps=5, teacher="pfd", teacher_hidden=(32,), swap_step=5, eval_max_rows=500)
RETRIEVAL = dict(positives="impressions", epochs=3, batch_size=128, num_uniform_negatives=32, user_hidden=(16,), item_hidden=(16,), dim=16,
                 eval_k=(50,))


@pytest.mark.parametrize("stage,mod,cfg,phase,step,every", [
    # fine: killed in the CVR phase (PFD teacher + student) after the CTR phase finished
    ("fine", FT, FT.Config(**FINE), 1, 3, 2),
    # coarse Ind&Async: killed in the student phase, the teacher phase restored from its final state
    ("coarse", C, C.Config(**COARSE, manner="ind_async"), 1, 7, 4),
    # coarse Share&Sync (student and teacher in one phase), killed in the second epoch
    ("coarse", C, C.Config(**COARSE), 0, 27, 4),
    # retrieval: killed in the third epoch; the snapshot carries the epoch's order and the generator
    ("retrieval", R, R.Config(**RETRIEVAL), 0, 17, 5),
])
def test_killed_and_resumed_run_ends_where_an_uninterrupted_one_ends(stage, mod, cfg, phase, step, every, tiny_data,
                                                                     tmp_path, monkeypatch, one_thread, kill_at,
                                                                     same_tensors, final_model):
    plain = mod.train(cfg, tiny_data, tmp_path / "plain", progress=False)
    seen = kill_at(phase, step)
    with pytest.raises(kill_at.Killed):
        mod.train(cfg, tiny_data, tmp_path / "run", progress=False, checkpoint_every=every)
    state = checkpoint.load(tmp_path / "run" / checkpoint.STATE_FILE, stage=stage)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    cur = state["current"]
    assert (cur["index"], cur["step"]) == (phase, step - step % every)  # lost step % every < every steps
    assert len(state["done"]) == phase

    monkeypatch.setattr(TrainingState, "on_step", None)
    resumed = mod.train(cfg, tiny_data, tmp_path / "run", progress=False, checkpoint_every=every, resume=True)
    assert same_tensors(final_model(tmp_path / "plain", stage), final_model(tmp_path / "run", stage))
    assert seen[-1] == (phase, step)
    key = {"fine": lambda m: m["ctr"]["auc"], "coarse": lambda m: m["auc"], "retrieval": lambda m: m["recall@50"]}[stage]
    assert key(resumed) == key(plain)


def test_resume_refuses_another_config_and_names_the_field(tiny_data, tmp_path, monkeypatch, one_thread, kill_at):
    cfg = FT.Config(**dict(FINE, cvr_teacher="none"))
    kill_at(0, 5)
    with pytest.raises(kill_at.Killed):
        FT.train(cfg, tiny_data, tmp_path, progress=False, checkpoint_every=4)
    monkeypatch.setattr(TrainingState, "on_step", None)
    other = FT.Config(**dict(FINE, cvr_teacher="none", ctr_lr=2e-3))
    with pytest.raises(CheckpointError, match=r"ctr_lr: checkpoint 0.001, this run 0.002"):
        FT.train(other, tiny_data, tmp_path, progress=False, checkpoint_every=4, resume=True)
    # another stage's training state is refused too
    with pytest.raises(CheckpointError, match="'fine' checkpoint, expected 'coarse'"):
        checkpoint.load_state(tmp_path / checkpoint.STATE_FILE, "coarse", {})
    # checkpoint_every may change between the runs: it does not change what is trained
    FT.train(cfg, tiny_data, tmp_path, progress=False, checkpoint_every=7, resume=True)


def test_a_truncated_training_state_is_refused(tiny_data, tmp_path, monkeypatch, one_thread, kill_at):
    cfg = FT.Config(**dict(FINE, cvr_teacher="none"))
    kill_at(0, 3)
    with pytest.raises(kill_at.Killed):
        FT.train(cfg, tiny_data, tmp_path, progress=False, checkpoint_every=2)
    path = tmp_path / checkpoint.STATE_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        FT.train(cfg, tiny_data, tmp_path, progress=False, resume=True)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_sigkill_then_cli_resume(tiny_data, tmp_path, one_thread, same_tensors, final_model):
    """A real kill: `recstack train fine --checkpoint-every 5` gets SIGKILL once a snapshot is
    on disk; `--resume` finishes it, bit-identical to an uninterrupted run."""
    sets = ["ctr_hidden=(32,16)", "cvr_hidden=(32,16)", "ctr_batch_size=256", "ctr_epochs=2", "cvr_batch_size=128"]
    cmd = [sys.executable, "-m", "recstack.cli", "train", "fine", "--data", tiny_data, "--out", str(tmp_path),
           "--checkpoint-every", "5", *(a for s in sets for a in ("--set", s))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    state = tmp_path / "fine" / checkpoint.STATE_FILE
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "fine" / "checkpoint.pt").exists()
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    from recstack.config import apply_overrides

    FT.train(apply_overrides(FT.Config(), sets), tiny_data, tmp_path / "plain", progress=False)
    assert same_tensors(final_model(tmp_path / "plain", "fine"), final_model(tmp_path / "fine", "fine"))
