"""Warm-start every stage on one day of logged traffic, and score a stage's checkpoint on a day.

    stats = warm_stage("fine", "runs/day03/fine/checkpoint.pt", "live/day04/world", "runs/day04/fine", origin)
    aucs = score_stage("coarse", "runs/day03/coarse/checkpoint.pt", "live/day04/world")

`world` is a folder `recstack.data.live_log.live_log_to_world` wrote from one day's impression
and event logs (plus the history the server saw); every impression in it is trained on, once:
one pass, from the checkpoint's weights and the optimiser state the previous day left
(`optimizer.pt` beside the checkpoint: Adam's moments carry over from day to day, as in
`recstack.training.loop.Stream`), at the stage's learning rate held constant, through the
stage's own step on the shared `recstack.training.loop.Loop`:

- retrieval: the clicked impressions, the in-batch sampled softmax with logQ from the day's
  click counts (`retrieval.tasks.InBatchSoftmaxStep`);
- coarse: every impression, the student distilled from the teacher the checkpoint carries, the
  first warm day continuing the initial training's optimiser state (also in the checkpoint)
  (trained with it in the same steps, as the initial training did: `coarse_rank.tasks.DistillationStep`,
  or `coarse_rank.objective.GmvStep` under the gmv objective); a checkpoint without a teacher
  trains the student alone;
- fine: CTR on every impression, CVR on the clicked ones, `fine_rank.tasks.fit` in its
  streaming mode (one pass, the head's bias kept), then the calibration the config asks for.

The checkpoint written names `origin` as its data folder: export snapshots that world (the
history the live events sit on), not the one-day log world.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recstack.data import load
from recstack.evaluation import metrics as M
from recstack.training import checkpoint as C
from recstack.training.loop import Ema, Loop, Stream, save_model

STAGES = ("retrieval", "coarse", "fine")
OPTIMIZER_FILE = "optimizer.pt"


def logged_days(data) -> list[int]:
    """The days of a world that hold impressions, in order: a log world lists them by day
    (`{"4": {...}}`), a simulated one as a list of `{"day": 4, ...}`."""
    days = data.world["days"]
    rows = days.items() if isinstance(days, dict) else ((v["day"], v) for v in days)
    return sorted(int(d) for d, v in rows if v["impressions"] > 0)


def _optimizer_state(ckpt_path: Path) -> dict | None:
    path = Path(ckpt_path).parent / OPTIMIZER_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def _save(out_dir: Path, stage: str, cfg, model_state, stats: dict, origin, vocab, opt_state: dict,
          extra: dict | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    C.save(out_dir / OPTIMIZER_FILE, opt_state)
    save_model(out_dir, stage, cfg, model_state, stats, origin, vocab, extra)


def warm_stage(stage: str, ckpt_path: str | Path, world: str | Path, out_dir: str | Path, origin: str | Path,
               served: str | Path | None = None) -> dict:
    """One pass of `stage` over `world`'s impressions from `ckpt_path`; writes
    `out_dir/checkpoint.pt` (+ optimizer.pt) -> {"rows": rows trained on, "steps", "loss", ...}.

    `served`: the bundle that served the day. A coarse checkpoint trained with `fine_distill`
    keeps learning the fine order from it: its fine ranker ranks the day's requests' retrieved
    candidates (`out_dir/fine_targets.npz`) and the day trains on those pairs too."""
    fn = {"retrieval": _warm_retrieval, "coarse": _warm_coarse, "fine": _warm_fine}.get(stage)
    if fn is None:
        raise ValueError(f"stage: unknown {stage!r}; one of {', '.join(STAGES)}")
    ck = C.load(ckpt_path, stage=stage)
    data = load(world)
    days = logged_days(data)
    if not days:
        raise ValueError(f"{world}: no logged impressions to train on")
    extra = {"served": served} if stage == "coarse" else {}
    return fn(ck, _optimizer_state(Path(ckpt_path)), data, days, Path(out_dir), origin, **extra)


def _warm_retrieval(ck, opt_state, data, days, out_dir, origin) -> dict:
    from retrieval.config import checkpoint_config
    from retrieval.inputs import add_row_stats, corpus_inputs, row_stats
    from retrieval.model import build_model
    from retrieval.tasks import InBatchSoftmaxStep, SampledSoftmaxLoss, sampling_log_q
    from retrieval.train import TRAIN_KEYS, materialise

    cfg = checkpoint_config(ck["config"])
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed * 1000 + days[-1])
    model = build_model(cfg, data.vocab)
    model.load_state_dict(ck["model"])
    loss_fn = SampledSoftmaxLoss(cfg.temperature, cfg.learn_temperature)
    opt = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    rows = add_row_stats(cfg, data, materialise(data.examples(days, clicked_only=True), TRAIN_KEYS))
    n = len(rows["item_id"])
    batch = min(cfg.batch_size, n)
    total = n // batch if n >= 2 else 0  # full batches only (the logQ estimate assumes batch_size candidates)
    counts = np.bincount(rows["item_id"], minlength=data.items.n)
    log_q = torch.from_numpy(sampling_log_q(counts, batch, cfg.num_uniform_negatives, cfg.logq_smoothing)
                             if cfg.logq_correction and total else np.zeros(data.items.n, np.float32))
    step = InBatchSoftmaxStep(model, loss_fn, corpus_inputs(data.items), log_q, rng, cfg.num_uniform_negatives, False,
                              row_stats(cfg, data))
    step.rows = rows
    order = rng.permutation(n)
    batches = lambda resume: ((order[s * batch:(s + 1) * batch], dict) for s in range(total))  # noqa: E731
    stats = _run(f"live:retrieval@day{days[-1]}", n, nn.ModuleDict({"model": model, "loss": loss_fn}), opt, total,
                 step, batches)
    stats.update(rows=int(n), rows_used=int(total * batch), positives="clicked impressions")  # full batches only
    _save(out_dir, "retrieval", cfg, model.state_dict(), stats, origin, data.vocab, opt.state_dict())
    return stats


def _warm_coarse(ck, opt_state, data, days, out_dir, origin, served=None) -> dict:
    from coarse_rank.fine_distill import FineTargets
    from coarse_rank.tasks import DistillationStep
    from coarse_rank.config import checkpoint_config
    from coarse_rank.train import GmvStep, build_student, build_teacher, training_batches
    from recstack.pipeline import fine_targets
    from recstack.training.distill import LambdaSchedule

    cfg = replace(checkpoint_config(ck["config"]), epochs=1)
    # the fine ranker's pairs (coarse_rank.fine_distill): the checkpoint's targets file holds its
    # initial training days, so a warm day builds its own from the bundle that served it (its fine
    # ranker has not seen the day); without that bundle it trains on its impressions alone, says
    # so, and saves the setting it trained with
    distilled, targets, fine_note = cfg.fine_distill > 0, None, None
    if distilled and served is not None:
        path = out_dir / "fine_targets.npz"
        t = time.perf_counter()
        meta = fine_targets.build(data, served, path, days=days, seed=cfg.seed, progress=False)
        cfg = replace(cfg, fine_targets=str(path))
        targets = FineTargets.load(path, data, cfg.fine_distill_top, days, cfg.item_stats)
        fine_note = (f"pairs of {meta['requests']} requests of day(s) {days} ranked by the served bundle "
                     f"{meta['bundle']} ({time.perf_counter() - t:.0f} s to build)")
    elif distilled:
        cfg = replace(cfg, fine_distill=0.0, fine_targets=None)
        fine_note = "off on this warm day: no served bundle to rank its requests, and the checkpoint's targets hold its initial training days"
    torch.manual_seed(cfg.seed)
    student = build_student(cfg, data.vocab)
    student.load_state_dict(ck["model"])
    # the teacher trained with the student keeps teaching it (PFD's synchronous training, one
    # pass); a checkpoint without one (a baseline, or an older file) trains the student alone
    teacher = build_teacher(cfg, data.vocab, student) if "teacher" in ck else None
    if teacher is not None:
        teacher.load_state_dict(ck["teacher"])
    frozen = teacher is not None and cfg.manner == "ind_async"  # trained first, then only read
    trained = nn.ModuleList([student] + ([teacher] if teacher is not None and not frozen else []))
    params = list(trained.parameters())  # a Parameter shared by student and teacher once
    opt = torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adagrad" \
        else torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # the previous warm day's optimiser, else the initial training's (its accumulators and
    # moments: a fresh Adagrad's first steps would move every touched weight by the full LR)
    origin_of_state = "previous day" if opt_state is not None else "initial training" if "optimizer" in ck else "fresh"
    opt_state = opt_state if opt_state is not None else ck.get("optimizer")
    if opt_state is not None:
        opt.load_state_dict(opt_state)
        for group in opt.param_groups:  # the constant LR of a warm day, whatever schedule the state ended on
            group["lr"] = cfg.lr
    ex = data.examples(days, item_stats=cfg.item_stats)
    n = len(ex)
    total = n // cfg.batch_size + (n % cfg.batch_size >= 2)
    # warmed up already: the trained teacher's soft labels count from the first step
    step = (GmvStep(cfg, student, teacher, LambdaSchedule(cfg.lam, 0), targets) if cfg.objective == "gmv"
            else DistillationStep(cfg, student, teacher, LambdaSchedule(cfg.lam, 0)))
    trained.train()
    if frozen:
        teacher.eval()
    stats = _run(f"live:coarse@day{days[-1]}", n, trained, opt, total, step, training_batches(cfg, ex, cfg.batch_size))
    stats.update(rows=int(n), teacher=(f"{cfg.teacher} ({'frozen' if frozen else 'trained with the student'})"
                                       if teacher is not None else "none"), optimizer=origin_of_state)
    if fine_note:
        stats["fine_distill"] = fine_note
    extra = {"teacher": teacher.state_dict()} if teacher is not None else None
    _save(out_dir, "coarse", cfg, student.state_dict(), stats, origin, data.vocab, opt.state_dict(), extra)
    return stats


def _warm_fine(ck, opt_state, data, days, out_dir, origin) -> dict:
    from fine_rank.calibration import calibrate_to_rate
    from fine_rank.config import checkpoint_config
    from fine_rank.inputs import clicked, materialise
    from fine_rank.tasks import build_model, fit, make_optimizer
    from fine_rank.train import label_for

    cfg = checkpoint_config(ck["config"])
    table = materialise(data.examples(days), sequence=cfg.uses_sequence, item_stats=cfg.item_stats)
    tables = {"ctr": table, "cvr": clicked(table)}
    models, opts, stats = {}, {}, {"rows": int(len(table["click"]))}
    for task, seed in (("ctr", cfg.seed), ("cvr", cfg.seed + 1)):
        s = cfg.settings(task)
        model = build_model(data.vocab, s, seed)
        model.load_state_dict(ck["model"][task])
        stream = Stream(days=(days[-1], days[-1] + 1))
        stream.index, stream.day = 1, days[-1]  # a warm day: the head's bias is kept, no prior reset
        opt = stream.optimizer(lambda: make_optimizer(model, s))
        if opt_state is not None and task in opt_state:
            opt.load_state_dict(opt_state[task])
        rows, label = tables[task], label_for(task, cfg)
        if len(rows["click"]) >= 2:
            stats[task] = fit(model, rows, label, s, seed, stream=stream)
            rate = float(np.mean(rows[label]))
            # a day without a positive (or a negative) has no rate to calibrate to: the bias stays
            if getattr(cfg, f"{task}_calibrate") == "labels" and 0.0 < rate < 1.0:
                stats[task]["calibration_shift"] = calibrate_to_rate(model, rows, rate, cfg.eval_batch_size)
        else:
            stats[task] = {"steps": 0, "n_train": int(len(rows["click"])), "skipped": "fewer than 2 rows"}
        stats[task]["rows"] = int(len(rows["click"]))
        models[task], opts[task] = model.state_dict(), opt.state_dict()
    _save(out_dir, "fine", cfg, models, stats, origin, data.vocab, opts)
    return stats


def _run(name: str, n: int, modules: nn.Module, opt, total: int, step, batches) -> dict:
    """The shared loop over one day: `total` steps, constant learning rate."""
    if total == 0:
        return {"steps": 0, "loss": math.nan}
    loop = Loop(name, n, modules, opt, total, Ema("running", 0.95, 0.05, empty=math.nan), carry_optimizer=True)
    return loop.run(step, batches)


# ------------------------------------------------------------------------------ scoring


def score_stage(stage: str, ckpt_path: str | Path, world: str | Path, days: list[int] | None = None) -> dict:
    """AUC of `stage`'s checkpoint on every logged impression of `world` (fine: CTR against
    clicks, CVR against purchases among the clicked) -> {"auc" | "ctr_auc", "cvr_auc", "n"}; for
    fine also each task's calibration, its mean prediction over the label rate ("ctr_calibration").
    `days`: only these days' impressions (default: every logged day)."""
    ck = C.load(ckpt_path, stage=stage)
    data = load(world)
    days = logged_days(data) if days is None else list(days)
    if stage == "retrieval":
        from retrieval.config import checkpoint_config
        from retrieval.inputs import ITEM_INPUTS, USER_INPUTS, add_row_stats, embed_users, materialise
        from retrieval.model import build_model

        cfg = checkpoint_config(ck["config"])
        model = build_model(cfg, data.vocab)
        model.load_state_dict(ck["model"])
        model.eval()
        ex = data.examples(days)
        inputs = add_row_stats(cfg, data, materialise(ex, USER_INPUTS + ITEM_INPUTS + ("day", "item_id")))
        u = embed_users(model, inputs)
        with torch.no_grad():
            v = model.item_tower(*(torch.from_numpy(inputs[k]) for k in ITEM_INPUTS)).numpy()
        score = (u * v).sum(axis=1)  # the inner product retrieval ranks by
        return {"auc": M.auc(ex.imps["click"], score), "n": int(len(score))}
    if stage == "coarse":
        from coarse_rank.config import checkpoint_config
        from coarse_rank.train import build_student, predict

        cfg = checkpoint_config(ck["config"])
        student = build_student(cfg, data.vocab)
        student.load_state_dict(ck["model"])
        p = predict(student, data.examples(days, item_stats=cfg.item_stats), cfg.eval_batch_size, cfg.length_buckets)
        return {"auc": M.auc(p["click"], p["logit"]), "n": int(len(p["click"]))}
    if stage == "fine":
        from fine_rank.calibration import predict
        from fine_rank.config import checkpoint_config
        from fine_rank.inputs import clicked, materialise
        from fine_rank.tasks import build_model

        cfg = checkpoint_config(ck["config"])
        table = materialise(data.examples(days), sequence=cfg.uses_sequence, item_stats=cfg.item_stats)
        out = {"n": int(len(table["click"]))}
        for task, rows, label in (("ctr", table, "click"), ("cvr", clicked(table), "purchase")):
            model = build_model(data.vocab, cfg.settings(task), 0)
            model.load_state_dict(ck["model"][task])
            model.eval()
            probs = predict(model, rows, cfg.eval_batch_size) if len(rows[label]) else None
            out[f"{task}_auc"] = M.auc(rows[label], probs) if probs is not None else math.nan
            out[f"{task}_n"] = int(len(rows[label]))
            # mean prediction / label rate: how far the served head's calibration drifts on a new day
            has_positive = probs is not None and bool(np.any(rows[label]))
            out[f"{task}_calibration"] = M.calibration(rows[label], probs) if has_positive else math.nan
        return out
    raise ValueError(f"stage: unknown {stage!r}; one of {', '.join(STAGES)}")
