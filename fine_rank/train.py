"""Train the fine ranker's CTR and CVR models and score them on the held-out day.

    cfg = Config(ctr_epochs=1)
    metrics = train(cfg, "data/small", "runs/fine")   # writes runs/fine/checkpoint.pt

CTR is fitted on every impression of the training days (label: click); CVR on the clicked
impressions only (label: purchase, or `purchase_observed` for the consent-limited stream),
both with the log-loss. Held-out metrics on the test day sit next to the ceiling that the
simulator's ground truth reaches on the same rows, and include calibration (mean
prediction / mean label), because the service multiplies pCTR x pCVR x price and so needs
calibrated probabilities, not just a good ordering.

The training method is chosen in `Config` (`fit_task` dispatches):

    cvr_teacher = sd | md | lupi | pfd | pfd_md   PFD Table 4: a `Teacher` trained synchronously
                                                  (Eq. 5, Algorithm 1), sharing the embeddings
                                                  (cvr_manner: Table 8's ind_sync / ind_async)
    cvr_teacher = mtl                             the MTL baseline (one tower per post-event feature)
    ctr_sead / cvr_sead = max | min | curriculum | ogl | dtl | positives_only   SEAD's aux head
    cvr_teacher = signal_loss (+ cvr_label=purchase_observed, cvr_calibrate=aggregates)
                                                  SEAD's signal-loss variant

Whatever the method, the model that is checkpointed and exported is the plain student
`Ranker` (no privileged inputs), so the bundle contract does not change.

Streaming (`Config.stream_chunk_rows` = N > 0; shards from `recstack simulate --shard-rows`):
CTR and CVR read the training days chunk by chunk (`StreamRows`, recstack.data.shards), each rank
its own slice, batch_size // world_size rows per rank per step, every method as in memory.
What needs every row is done without holding them: label means, consent totals and the
post-event moments (MTL) in one pass over those columns; BatchNorm re-estimation and the
label calibration use a bounded sample (STREAM_SAMPLE_ROWS rows of a seeded shuffled pass).
The held-out day stays in memory. N = 0 (default) is the in-memory path, unchanged.
"""
from __future__ import annotations
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from recstack.training import distributed as D
from recstack.evaluation import metrics as M
from recstack.data import load
from recstack.training.loop import save_model, training_state

# the stage's names, importable from here as before the stage was split into modules
from fine_rank.calibration import (  # noqa: F401
    aggregate_metrics, aggregate_rate, aggregates, calibrate_to_rate, holdout_split, predict, predict_with,
)
from fine_rank.config import (  # noqa: F401
    CALIBRATIONS, CVR_LABELS, CVR_TEACHERS, OPTIMIZERS, SEAD_MODES, SPLITS, STAGE, TASKS, Config, ModelSettings,
)
from fine_rank.data import STREAM_SAMPLE_ROWS, Source, StreamRows  # noqa: F401
from fine_rank.inputs import MODEL_INPUTS, TABLE_COLUMNS, clicked, materialise, split_days  # noqa: F401
from fine_rank.model import MTLRanker, Ranker, SelfAuxiliary, SignalTeacher, build_teacher
from fine_rank.tasks import (  # noqa: F401
    build_model, fit, fit_distilled, fit_distilled_async, fit_mtl, fit_sead, fit_signal_loss, make_optimizer, optimise, refresh_batchnorm,
)


# -------------------------------------------------------------------------- methods


@dataclass
class TaskResult:
    """A trained task: the serving student, its training stats, and the extra heads that
    the reports score (teacher, auxiliary head) as functions of a table -> (N,) probs."""

    model: Ranker
    stats: dict
    extras: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]]


# the signal-loss teacher tower's own initial weights (the student's seed would make the two
# towers start identical)
TEACHER_SEED_OFFSET = 7919


def label_for(task: str, cfg: Config) -> str:
    return "click" if task == "ctr" else cfg.cvr_label


def fit_task(task: str, cfg: Config, vocab, table: "dict[str, np.ndarray] | StreamRows", seed: int, *, bar=None,
             aggregate_rate: float | None = None) -> TaskResult:
    """Train `task` ("ctr" or "cvr") with the method `cfg` selects on `table` (the task's
    population: a materialised table, or a `StreamRows`); -> the eval-mode student and its
    extras. `aggregate_rate` is required when cfg.cvr_calibrate == "aggregates" (CVR).
    Streamed, the calibration shift is fitted on the bounded sample (StreamRows.sample_table)
    to the label mean of every training row. With cfg.calibration_holdout > 0 (in memory) that
    fraction of the rows is kept out of fitting and the shift is fitted on it instead."""
    s = cfg.settings(task)
    label = label_for(task, cfg)
    calibrate = getattr(cfg, f"{task}_calibrate")
    held, label_mean = None, None
    if calibrate != "none" and cfg.calibration_holdout > 0:
        if isinstance(table, StreamRows):
            raise ValueError("calibration_holdout needs a materialised table, not a stream")
        label_mean = float(np.mean(table[label]))  # the target: every training row's label mean
        table, held = holdout_split(table, cfg.calibration_holdout, seed)
    student = build_model(vocab, s, seed)  # the same initial student for every method of a seed
    extras: dict[str, Callable] = {}
    bs = cfg.eval_batch_size
    method = cfg.cvr_teacher if task == "cvr" else "none"
    selector = getattr(cfg, f"{task}_sead")
    if method in ("sd", "md", "lupi", "pfd", "pfd_md"):
        # Ind manners: the teacher's embeddings (and sequence attention) are a second ranker's, initialised apart
        own = build_model(vocab, s, seed + TEACHER_SEED_OFFSET) if cfg.cvr_manner != "share_sync" else None
        teacher = build_teacher(method, student, s.hidden, cfg.cvr_md_hidden, inputs=own)
        if cfg.cvr_manner == "ind_async":
            stats = fit_distilled_async(student, teacher, table, label, s, seed, cfg.distill_lambda, bar)
        else:
            stats = fit_distilled(student, teacher, table, label, s, seed, cfg.distill_lambda, cfg.distill_warmup, bar)
        stats["manner"] = cfg.cvr_manner
        teacher.eval()
        extras["teacher"] = lambda t, m=teacher: predict_with(m.logits, t, bs, privileged=True)
    elif method == "oracle":
        from fine_rank.oracle import TRUTH_COLUMN, fit_oracle

        stats = fit_oracle(student, table, label, TRUTH_COLUMN[task], s, seed, cfg.distill_lambda, bar)
    elif method == "mtl":
        mtl = MTLRanker(student, aux_hidden=cfg.mtl_hidden)
        stats = fit_mtl(mtl, table, label, s, seed, cfg.mtl_weight, bar)
    elif method == "signal_loss":
        teacher = SignalTeacher(build_model(vocab, s, seed + TEACHER_SEED_OFFSET), cfg.sead_aux_width)
        stats = fit_signal_loss(student, teacher, table, label, s, seed, cfg.distill_warmup, bar)
        teacher.eval()
        extras["teacher"] = lambda t, m=teacher: predict_with(m.main.logits, t, bs)
        extras["teacher_aux"] = lambda t, m=teacher: predict_with(lambda *xs: m.both(*xs)[1], t, bs)
    elif selector != "none":
        wrapped = SelfAuxiliary(student, cfg.sead_aux_width)
        stats = fit_sead(wrapped, table, label, s, seed, selector, cfg, bar)
        wrapped.eval()
        extras["aux"] = lambda t, m=wrapped: predict_with(lambda *xs: m.aux_logits(selector, *xs), t, bs)
    else:
        stats = fit(student, table, label, s, seed, bar)
    student.eval()
    if calibrate != "none":
        if calibrate == "aggregates":
            if aggregate_rate is None:
                raise ValueError("cvr_calibrate=aggregates needs aggregates.parquet (the training days' aggregated conversions)")
            target = aggregate_rate
        elif label_mean is not None:
            target = label_mean
        else:
            target = float(np.mean(table[label])) if not isinstance(table, StreamRows) else table.mean(label)
        rows = held if held is not None else table.sample_table(seed) if isinstance(table, StreamRows) else table
        stats["calibration_shift"] = calibrate_to_rate(student, rows, target, bs)
        stats["calibrated_to"] = target
        stats["calibration_rows"] = int(len(rows["click"]))
    stats["method"] = method if method != "none" else (f"sead_{selector}" if selector != "none" else "baseline")
    return TaskResult(student, stats, extras)


def evaluate(labels: np.ndarray, probs: np.ndarray, truth: np.ndarray) -> dict:
    """Held-out metrics of `probs`, each next to the ground truth's value on the same rows."""
    labels = np.asarray(labels, dtype=np.float64)
    # a real log has no truth columns (docs/DATA.md): the truth metrics are then NaN, reported as skipped
    known = bool(len(truth)) and bool(np.isfinite(truth).all())
    nan = float("nan")
    return {
        "n": int(len(labels)),
        "auc": M.auc(labels, probs),
        "auc_truth": M.auc(labels, truth) if known else nan,
        "logloss": M.logloss(labels, probs),
        "logloss_truth": M.logloss(labels, truth) if known else nan,
        "calibration": M.calibration(labels, probs),
        # the truth's own ratio shows how far sampling noise alone moves the label mean
        "calibration_truth": M.calibration(labels, truth) if known else nan,
        # mean prediction / mean true probability: the model's own bias, free of label noise
        "calibration_vs_truth": float(np.mean(probs) / max(np.mean(truth), 1e-12)) if known else nan,
        "mean_pred": float(np.mean(probs)),
        "mean_label": float(np.mean(labels)),
    }


def format_metrics(m: dict) -> str:
    lines = [f"fine ranker, held-out day {m['eval_day']} (fit on days {m['train_days']}):"]
    for task in TASKS:
        e = m[task]
        head = f"  {task.upper()} [{e['label']}{'' if e['train_label'] == e['label'] else ', trained on ' + e['train_label']}, n={e['n']}]"
        tail = f"[{e['train']['method']}, {e['train']['steps']} steps, {e['train']['train_seconds']:.1f}s]"
        if np.isfinite(e["auc_truth"]) or np.isfinite(e["logloss_truth"]):
            lines.append(
                f"{head}  AUC {e['auc']:.4f} (truth {e['auc_truth']:.4f})  "
                f"log-loss {e['logloss']:.4f} (truth {e['logloss_truth']:.4f})  "
                f"calibration {e['calibration']:.3f} (truth {e['calibration_truth']:.3f}; "
                f"vs truth {e['calibration_vs_truth']:.3f})  {tail}"
            )
        else:
            lines.append(f"{head}  AUC {e['auc']:.4f}  log-loss {e['logloss']:.4f}  calibration {e['calibration']:.3f}  "
                         f"(truth metrics skipped: the data has no true_p{task})  {tail}")
        for extra in ("teacher", "teacher_aux", "aux"):
            if extra in e:
                lines.append(f"    {extra}: AUC {e[extra]['auc']:.4f}  calibration {e[extra]['calibration']:.3f}")
        if "vs_aggregates" in e:
            a = e["vs_aggregates"]
            lines.append(f"    vs aggregates: AUC {a['auc_aggregated']:.4f}  calibration {a['calibration_aggregated']:.3f}")
    return "\n".join(lines)


def train(cfg: Config, data_dir: str | Path, out_dir: str | Path, *, progress: bool = True, resume: bool = False,
          checkpoint_every: int = 0) -> dict:
    """Fit CTR and CVR, score them on the held-out day, save `out_dir/checkpoint.pt`; -> metrics.

    checkpoint_every: write the training state to `out_dir/train_state.pt` every that many
    optimiser steps (0: never); resume: continue from that file when it exists (a run that
    ends bit-identical to an uninterrupted one). Under torchrun every rank trains, rank 0
    scores the held-out day, prints and writes; the other ranks return the training stats.
    """
    cfg.validate()
    D.check_divisible(ctr_batch_size=cfg.ctr_batch_size, cvr_batch_size=cfg.cvr_batch_size)
    t_start = time.perf_counter()
    main = D.is_main()
    data = load(data_dir)
    fit_days, eval_day = split_days(data, cfg.split)
    seq = cfg.uses_sequence  # the (N, L) sequence columns only when a model reads them
    stats = cfg.item_stats
    # the held-out day stays in memory, streamed or not
    eval_table = materialise(data.examples(eval_day), sequence=seq, item_stats=stats)
    if cfg.stream_chunk_rows:
        tables = {"ctr": (StreamRows(data, fit_days, cfg.stream_chunk_rows, item_stats=stats), eval_table),
                  "cvr": (StreamRows(data, fit_days, cfg.stream_chunk_rows, clicked_only=True, item_stats=stats),
                          clicked(eval_table))}
    else:
        train_table = materialise(data.examples(fit_days), sequence=seq, item_stats=stats)
        tables = {"ctr": (train_table, eval_table), "cvr": (clicked(train_table), clicked(eval_table))}
    labels = {task: label_for(task, cfg) for task in TASKS}
    truths = {"ctr": "true_pctr", "cvr": "true_pcvr"}
    settings = {task: cfg.settings(task) for task in TASKS}
    seeds = {"ctr": cfg.seed, "cvr": cfg.seed + 1}
    t_data = time.perf_counter() - t_start

    fit_agg = aggregates(data, fit_days)  # None without aggregates.parquet (optional, docs/DATA.md)
    agg_rate = aggregate_rate(fit_agg) if fit_agg is not None else None
    total_steps = sum(settings[t].steps(len(tables[t][0]["click"])) if not cfg.stream_chunk_rows
                      else tables[t][0].steps(settings[t], seeds[t]) for t in TASKS)
    models: dict[str, Ranker] = {}
    metrics: dict = {"eval_day": eval_day, "train_days": list(fit_days), "split": cfg.split, "data_seconds": t_data}
    state = training_state(out_dir, STAGE, cfg, checkpoint_every, resume)
    with state, tqdm(total=total_steps, desc="fine", disable=not (progress and main), unit="step") as bar:
        for task in TASKS:
            fit_rows, eval_rows = tables[task]
            bar.set_description(f"fine {task}")
            result = fit_task(task, cfg, data.vocab, fit_rows, seeds[task], bar=bar, aggregate_rate=agg_rate)
            models[task] = result.model
            if not main:
                metrics[task] = {"train": result.stats}
                continue
            probs = predict(result.model, eval_rows, cfg.eval_batch_size)
            # CVR is always scored against real purchases: under signal loss the training
            # label undercounts them, and the service needs the true conversion probability
            eval_label = "click" if task == "ctr" else "purchase"
            m = evaluate(eval_rows[eval_label], probs, eval_rows[truths[task]])
            m["label"] = eval_label
            m["train_label"] = labels[task]
            m["train"] = result.stats
            if labels[task] != eval_label:
                m["vs_train_label"] = evaluate(eval_rows[labels[task]], probs, eval_rows[truths[task]])
            if task == "cvr" and fit_agg is not None:
                m["vs_aggregates"] = aggregate_metrics(eval_rows, probs, aggregates(data, eval_day))
            for name, extra in result.extras.items():
                m[name] = evaluate(eval_rows[eval_label], extra(eval_rows), eval_rows[truths[task]])
            metrics[task] = m
    metrics["wall_seconds"] = time.perf_counter() - t_start
    if state.resumed:
        metrics["resumed"] = True
    if main:
        if progress:
            print(format_metrics(metrics))
        save_model(out_dir, STAGE, cfg, {task: models[task].state_dict() for task in TASKS}, metrics, data_dir,
                   data.vocab)
    D.barrier()
    return metrics
