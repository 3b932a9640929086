"""Streaming training of a fine-ranker task: one pass over each day's impressions, warm-started
from the previous day's model and optimiser state, scored on the next day
(recstack.training.loop.Stream), as production rankers are continuously trained.

    days = day_tables(data, "cvr")                          # {day: the task's rows of that day}
    curve = fit_stream("cvr", cfg, data.vocab, days, seed=1, aggregates=day_aggregates(data))
    curve[-1]["auc"], curve[-1]["calibration"]              # day D-1's model scored on day D

Methods: the plain log-loss, SEAD (`*_sead`) and the signal-loss variant (cvr_teacher=
signal_loss); `rows="consented"` trains on the consented users' rows only. The served model
of a day is calibrated as `*_calibrate` says against that training day (its label mean, or its
aggregated conversion rate), and the shift is undone before the next day trains, so the
calibration never feeds back into training.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from recstack.config import ConfigError
from recstack.evaluation import metrics as M
from recstack.training.loop import Stream

from fine_rank.calibration import aggregate_metrics, aggregate_rate, aggregates, calibrate_to_rate, predict, predict_with
from fine_rank.config import Config
from fine_rank.inputs import clicked, materialise
from fine_rank.model import SelfAuxiliary, SignalTeacher
from fine_rank.tasks import build_model, fit, fit_sead, fit_signal_loss

STREAM_METHODS = ("none", "signal_loss")  # the cvr_teacher values streaming supports


def day_tables(data, task: str, sequence: bool = False, item_stats: bool = True) -> dict[int, dict[str, np.ndarray]]:
    """{day: the task's population of that day} (CTR: every impression; CVR: the clicked ones),
    with the behaviour-sequence columns only when `sequence` (a ranker with `*_sequence="din"`) and
    the item statistics in `item_dense` when `item_stats`."""
    out = {}
    for d in range(1, data.n_days + 1):
        t = materialise(data.examples(d), sequence=sequence, item_stats=item_stats)
        out[d] = t if task == "ctr" else clicked(t)
    return out


def day_aggregates(data) -> dict[int, dict[str, np.ndarray]]:
    return {d: aggregates(data, d) for d in range(1, data.n_days + 1)}


def _eval_label(task: str) -> str:
    return "click" if task == "ctr" else "purchase"


def fit_stream(task: str, cfg: Config, vocab, days: dict[int, dict[str, np.ndarray]], seed: int, *,
               aggregates: dict[int, dict] | None = None, rows: str = "all") -> list[dict]:
    """Train `task` with cfg's method through `days` in order; -> one entry per training day d:
    {"day", "eval_day", "train", "auc", "calibration", ...} of the model after day d, scored on
    day d + 1 (CVR against the real purchases, whatever label it learns from)."""
    s = cfg.settings(task)
    label = "click" if task == "ctr" else cfg.cvr_label
    method = cfg.cvr_teacher if task == "cvr" else "none"
    selector = getattr(cfg, f"{task}_sead")
    calibrate = getattr(cfg, f"{task}_calibrate")
    if method not in STREAM_METHODS:
        raise ConfigError(f"cvr_teacher={method!r} has no streaming mode; streaming runs one of {STREAM_METHODS}")
    if rows not in ("all", "consented"):
        raise ConfigError(f"rows must be 'all' or 'consented', got {rows!r}")
    if (calibrate == "aggregates" or method == "signal_loss") and aggregates is None:
        raise ConfigError("aggregates: the daily aggregates are needed to calibrate to them and to score signal loss")
    stream = Stream(days=tuple(sorted(days)))
    student = build_model(vocab, s, seed)
    extras: dict[str, Callable] = {}
    bs = cfg.eval_batch_size

    def fit_rows(d: int) -> dict:
        t = days[d]
        return {k: v[t["consent"] > 0.5] for k, v in t.items()} if rows == "consented" else t

    if method == "signal_loss":
        teacher = SignalTeacher(build_model(vocab, s, seed + 7919), cfg.sead_aux_width)
        train = lambda d: fit_signal_loss(student, teacher, fit_rows(d), label, s, seed, cfg.distill_warmup,  # noqa: E731
                                          stream=stream)
        extras["teacher"] = lambda t: predict_with(teacher.main.logits, t, bs)
    elif selector != "none":
        wrapped = SelfAuxiliary(student, cfg.sead_aux_width)
        train = lambda d: fit_sead(wrapped, fit_rows(d), label, s, seed, selector, cfg, stream=stream)  # noqa: E731
        extras["aux"] = lambda t: predict_with(lambda *xs: wrapped.aux_logits(selector, *xs), t, bs)
    else:
        train = lambda d: fit(student, fit_rows(d), label, s, seed, stream=stream)  # noqa: E731

    def score(eval_day: int) -> dict:
        target = None
        if calibrate == "labels":
            target = float(np.mean(fit_rows(stream.day)[label]))
        elif calibrate == "aggregates":
            target = aggregate_rate(aggregates[stream.day])
        shift = calibrate_to_rate(student, fit_rows(stream.day), target, bs) if target is not None else 0.0
        m = score_day(task, days[eval_day], predict(student, days[eval_day], bs),
                      {k: f(days[eval_day]) for k, f in extras.items()},
                      aggregates[eval_day] if aggregates is not None and task == "cvr" else None)
        # in-sample: the served model's mean prediction over the label mean of the day it just
        # trained on (the head's own fit, free of the day-to-day change of the rate)
        seen = fit_rows(stream.day)
        m["calibration_train_day"] = float(np.mean(predict(student, seen, bs)) / max(np.mean(seen[label]), 1e-12))
        if shift:  # the served model's shift; tomorrow trains on from the unshifted model
            student.head.linear.bias.data -= shift
        return {**m, "calibration_shift": shift}

    return stream.run(train, score)


def score_day(task: str, rows: dict, probs: np.ndarray, extras: dict[str, np.ndarray], agg: dict | None) -> dict:
    """Next-day metrics of one model: AUC and calibration on the real labels, the extra heads'
    AUC, and (when the day's aggregates are given) the observed-label AUC and the aggregates'."""
    lab = rows[_eval_label(task)]
    truth = rows["true_pctr" if task == "ctr" else "true_pcvr"]
    m = {"auc": M.auc(lab, probs), "calibration": M.calibration(lab, probs),
         "calibration_vs_truth": float(np.mean(probs) / np.mean(truth)), "mean_pred": float(np.mean(probs)),
         "mean_label": float(np.mean(lab)), "n": int(len(lab))}
    for name, p in extras.items():
        m[f"{name}_auc"] = M.auc(lab, p)
    if agg is not None:
        m["auc_observed"] = M.auc(rows["purchase_observed"], probs)
        c = rows["consent"] > 0.5  # the consented users' rows: observed labels there are unbiased
        m["auc_consented"] = M.auc(rows["purchase_observed"][c], probs[c])
        m.update(aggregate_metrics(rows, probs, agg))
    return m
