"""Streamed training (`stream_chunk_rows > 0`): the trainers read the training days chunk by
chunk from the Parquet shards (recstack.data.shards.ShardStream) instead of materialising them.

On a `tiny` world written with small shards (several per day, cut by the chunks):
streamed runs of every stage end near the in-memory run's held-out metric, 2 streamed ranks
hold identical parameters, and a killed streamed run resumes to the end an uninterrupted
streamed run reaches, bit for bit.
"""
from __future__ import annotations

import json
import runpy
import textwrap

import pytest

import coarse_rank.train as C
import fine_rank.train as FT
import retrieval.train as R
from recstack.training import checkpoint
from recstack.training.checkpoint import CheckpointError, TrainingState
from recstack.config import ConfigError
from recstack.world import preset, simulate

SHARD_ROWS = 1000  # ~7 shards per `tiny` day; the 1024-row chunks below cut across them
CHUNK = 1024  # a multiple of every batch size below (per rank too), so the step counts equal the in-memory ones

COARSE = dict(embed_dim=8, d_model=32, n_heads=4, ff_dim=64, hidden=(64,), out_dim=32, batch_size=256, epochs=2,
              lr=0.003, optimizer="adam", warmup_steps=10, teacher="pfd", manner="share_sync", swap_step=20,
              teacher_hidden=(64, 32), max_steps=0, item_stats=False)  # the tolerances below were set without them
FINE = dict(ctr_hidden=(64, 32), cvr_hidden=(64, 32), ctr_batch_size=256, ctr_epochs=2, cvr_batch_size=128,
            cvr_teacher="pfd", cvr_md_hidden=(64, 32))
RETRIEVAL = dict(positives="impressions", epochs=3, batch_size=128, num_uniform_negatives=64, user_hidden=(32,), item_hidden=(32,),
                 eval_k=(50, 100))

# Streamed vs in-memory held-out metric: about the seed-to-seed spread of these runs.
# Measured (one process, seeds 0-2, in memory -> streamed with CHUNK): coarse AUC 0.602->0.611,
# 0.593->0.590, 0.608->0.596 (in-memory spread 0.015); CTR AUC 0.661->0.658, 0.649->0.655,
# 0.649->0.643 (0.013); CVR AUC 0.588->0.600, 0.617->0.616, 0.648->0.648 (0.06); retrieval
# recall@50 (seeds 0-1) 0.410->0.422, 0.451->0.426 (0.04).
TOL = {"coarse": 0.03, "ctr": 0.02, "cvr": 0.03, "retrieval": 0.05}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tiny_sharded")
    simulate(preset("tiny"), seed=0, out=out, preset="tiny", progress=False, shard_rows=SHARD_ROWS)
    return str(out)


def _coarse(data_dir: str, chunk: int) -> dict:
    from recstack.data import load

    data = load(data_dir)
    return C.fit(C.Config(**COARSE, stream_chunk_rows=chunk), data, data.train_days, data.test_day).result


def test_streamed_runs_reach_the_in_memory_metrics(sharded, tmp_path, one_thread):
    got = {}
    for chunk in (0, CHUNK):
        c = _coarse(sharded, chunk)
        f = FT.train(FT.Config(**FINE, stream_chunk_rows=chunk), sharded, tmp_path / f"fine{chunk}", progress=False)
        r = R.train(R.Config(**RETRIEVAL, stream_chunk_rows=chunk), sharded, tmp_path / f"retr{chunk}", progress=False)
        got[chunk] = {"coarse": (c["auc"], c["steps"], c["train_examples"]),
                      "ctr": (f["ctr"]["auc"], f["ctr"]["train"]["steps"], f["ctr"]["train"]["n_train"]),
                      "cvr": (f["cvr"]["auc"], f["cvr"]["train"]["steps"], f["cvr"]["train"]["n_train"]),
                      "retrieval": (r["recall@50"], r["steps"], r["train_clicks"])}
        if chunk:
            assert f["ctr"]["train"]["stream_chunk_rows"] == chunk and r["stream_chunk_rows"] == chunk
            assert c["stream_chunk_rows"] == chunk
    mem, st = got[0], got[CHUNK]
    for stage, tol in TOL.items():
        assert st[stage][1:] == mem[stage][1:], (stage, "same rows and steps", st[stage], mem[stage])
        assert abs(st[stage][0] - mem[stage][0]) <= tol, (stage, st[stage][0], mem[stage][0])
    # both learn, so the comparison means something
    assert st["coarse"][0] > 0.56 and st["ctr"][0] > 0.6 and st["retrieval"][0] > 0.3


def test_streamed_retrieval_reads_the_item_statistics(sharded, tmp_path, one_thread):
    from retrieval.evaluation import load_model

    cfg = R.Config(**{**RETRIEVAL, "epochs": 1}, item_stats=True, stream_chunk_rows=CHUNK)
    r = R.train(cfg, sharded, tmp_path / "retr", progress=False)
    assert r["stream_chunk_rows"] == CHUNK and r["steps"] > 0
    assert r["recall@50"] > 5 * r["random_recall@50"], r
    model, _, _ = load_model(tmp_path / "retr" / "checkpoint.pt")
    assert model.item_tower.n_dense == 1 + 12  # the price, then every source's 1 d and 7 d fields


# The 2 ranks each stream their own slice (batches of batch_size / 2 rows); one process
# streams everything with the same chunk rows per rank.
WORKER = textwrap.dedent('''
    import json, sys
    import torch
    from recstack.training import distributed as D
    from recstack.data import load
    import coarse_rank.train as C
    import fine_rank.train as FT
    import retrieval.train as R

    def run(data_dir, out_dir, coarse, fine, retrieval, chunk):
        data = load(data_dir)
        out = {}
        f = C.fit(C.Config(**coarse, stream_chunk_rows=chunk), data, data.train_days, data.test_day)
        out["coarse"] = {"auc": f.result["auc"], "steps": f.result["steps"],
                         "params": D.state_digest(f.student.state_dict()),
                         "teacher_params": D.state_digest(f.teacher.state_dict())}
        cfg = FT.Config(**fine, stream_chunk_rows=chunk)
        ev = FT.materialise(data.examples(data.test_day))
        for task, clicked in (("ctr", False), ("cvr", True)):
            rows = FT.StreamRows(data, data.train_days, chunk, clicked_only=clicked)
            r = FT.fit_task(task, cfg, data.vocab, rows, cfg.seed + clicked, aggregate_rate=0.1)
            e = FT.clicked(ev) if clicked else ev
            label = "purchase" if clicked else "click"
            out[task] = {"auc": FT.evaluate(e[label], FT.predict(r.model, e), e["true_pctr"])["auc"],
                         "steps": r.stats["steps"], "params": D.state_digest(r.model.state_dict())}
        built = []
        orig = R.build_model
        R.build_model = lambda *a: built.append(orig(*a)) or built[-1]
        m = R.train(R.Config(**retrieval, stream_chunk_rows=chunk), data_dir, out_dir, progress=False)
        R.build_model = orig
        out["retrieval"] = {"steps": m["steps"], "recall": m.get("recall@50"), "params": D.state_digest(built[0].state_dict())}
        return out

    if __name__ == "__main__":
        torch.set_num_threads(1)
        w = D.init()
        args = json.loads(sys.argv[1])
        res = run(**args)
        res["rank"], res["world_size"] = w.rank, w.size
        json.dump(res, open(f"{args['out_dir']}.rank{w.rank}.json", "w"))
        D.destroy()
''')


def test_two_streamed_ranks_hold_identical_parameters(sharded, tmp_path, one_thread, launch):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    small = dict(d_model=16, n_heads=2, ff_dim=32, hidden=(32,), out_dim=16, teacher_hidden=(32,))
    args = dict(data_dir=sharded, out_dir=str(tmp_path / "two"), coarse=dict(COARSE, **small, epochs=1),
                fine=dict(FINE, ctr_epochs=1, cvr_epochs=1), retrieval=dict(RETRIEVAL, epochs=2), chunk=CHUNK // 2)
    launch([str(worker), json.dumps(args)], tmp_path)
    r0, r1 = (json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in range(2))
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    for stage in ("coarse", "ctr", "cvr", "retrieval"):
        assert r0[stage]["params"] == r1[stage]["params"], stage
        assert r0[stage]["steps"] == r1[stage]["steps"] > 0, stage
    assert r0["coarse"]["teacher_params"] == r1["coarse"]["teacher_params"]
    # one process streaming the same rows: the same number of global steps, a nearby metric
    single = runpy.run_path(str(worker))["run"](**dict(args, out_dir=str(tmp_path / "one")))
    for stage, tol in TOL.items():
        assert r0[stage]["steps"] == single[stage]["steps"], stage
        key = "recall" if stage == "retrieval" else "auc"
        assert abs(r0[stage][key] - single[stage][key]) <= tol, (stage, r0[stage][key], single[stage][key])


@pytest.mark.parametrize("stage,mod,cfg,phase,step,every", [
    # fine: killed mid-chunk (4 batches of 256 per chunk) in the CVR phase, CTR restored from its final state
    ("fine", FT, FT.Config(**dict(FINE, ctr_epochs=1, cvr_epochs=2), stream_chunk_rows=CHUNK), 1, 7, 3),
    # coarse Ind&Async: killed mid-chunk in the student phase, the teacher phase restored from its final state
    ("coarse", C, C.Config(**dict(COARSE, d_model=16, n_heads=2, ff_dim=32, hidden=(32,), out_dim=16, manner="ind_async",
                                  max_steps=30, eval_max_rows=1000), stream_chunk_rows=CHUNK), 1, 27, 5),
    # retrieval: killed in the second epoch (one 985-row chunk per epoch: 7 full batches of 128)
    ("retrieval", R, R.Config(**RETRIEVAL, stream_chunk_rows=CHUNK), 0, 12, 5),
])
def test_killed_streamed_run_resumes_bit_identical(stage, mod, cfg, phase, step, every, sharded, tmp_path, monkeypatch,
                                                    one_thread, kill_at, same_tensors, final_model):
    plain = mod.train(cfg, sharded, tmp_path / "plain", progress=False)
    seen = kill_at(phase, step)
    with pytest.raises(kill_at.Killed):
        mod.train(cfg, sharded, tmp_path / "run", progress=False, checkpoint_every=every)
    state = checkpoint.load(tmp_path / "run" / checkpoint.STATE_FILE, stage=stage)
    cur = state["current"]
    assert (cur["index"], cur["step"]) == (phase, step - step % every)
    assert cur["stream"]["cursor"]["stream"] != 0 and cur["stream"]["chunk_batches_done"] > 0
    monkeypatch.setattr(TrainingState, "on_step", None)
    resumed = mod.train(cfg, sharded, tmp_path / "run", progress=False, checkpoint_every=every, resume=True)
    assert seen[-1] == (phase, step)
    assert same_tensors(final_model(tmp_path / "plain", stage), final_model(tmp_path / "run", stage))
    key = {"fine": lambda m: m["cvr"]["auc"], "coarse": lambda m: m["auc"], "retrieval": lambda m: m["recall@50"]}[stage]
    assert key(resumed) == key(plain)


def test_a_streamed_checkpoint_is_refused_by_another_chunking(sharded, tmp_path, monkeypatch, one_thread, kill_at):
    cfg = FT.Config(**dict(FINE, cvr_teacher="none"), stream_chunk_rows=CHUNK)
    kill_at(0, 5)
    with pytest.raises(kill_at.Killed):
        FT.train(cfg, sharded, tmp_path, progress=False, checkpoint_every=4)
    monkeypatch.setattr(TrainingState, "on_step", None)
    for other in (512, 0):  # another chunking, or the in-memory path
        with pytest.raises(CheckpointError, match=rf"stream_chunk_rows: checkpoint {CHUNK}, this run {other}"):
            FT.train(FT.Config(**dict(FINE, cvr_teacher="none"), stream_chunk_rows=other), sharded, tmp_path,
                     progress=False, resume=True)


def test_bad_stream_settings_are_refused():
    with pytest.raises(ConfigError, match="stream_chunk_rows must be >= 0"):
        C.Config(stream_chunk_rows=-1).validate()
    with pytest.raises(ConfigError, match="train_fraction < 1 .* not available with stream_chunk_rows"):
        C.Config(stream_chunk_rows=100, train_fraction=0.5).validate()
    with pytest.raises(ConfigError, match="stream_chunk_rows must be >= 0"):
        FT.Config(stream_chunk_rows=-1)
    with pytest.raises(ConfigError, match="stream_chunk_rows must be >= 0"):
        R.Config(stream_chunk_rows=-1).validate()
