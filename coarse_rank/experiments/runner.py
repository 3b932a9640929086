"""The coarse experiments' fits: one fit per (config, days, evaluation day), run in a pool of
worker processes and cached on disk, and the summaries of fits over seeds."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import torch

from recstack.data import SimData, load
from recstack.evaluation import metrics
from recstack.evaluation import protocol as X

from coarse_rank.experiments.plan import CoarsePlan
from coarse_rank.train import Config, Fitted, fit


def _job_key(data_dir: str, cfg: Config, days: list[int], eval_day: int) -> str:
    fields = dataclasses.asdict(cfg)
    # fields added later, at the value every fit before them had: keyed only when changed, so
    # the fits cached before the field keep their keys
    for later, before in (("stream_chunk_rows", 0), ("item_stats", False), ("lr_schedule", "constant")):
        if fields.get(later, before) == before:
            fields.pop(later, None)
    if not fields.get("fine_distill"):
        for k in [k for k in fields if k.startswith("fine_distill") or k == "fine_targets"]:
            fields.pop(k)
    blob = json.dumps([str(Path(data_dir).resolve()), fields, list(days), int(eval_day)], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


_DATA: dict[str, SimData] = {}


def save_fitted(path: Path, f: Fitted) -> None:
    """Cache a fit's metrics and predictions as .npz (no pickle): arrays under s/, t/, i/ and the
    metrics as one JSON string."""
    arrays = {f"s/{k}": v for k, v in f.student_pred.items()}
    arrays.update({f"t/{k}": v for k, v in (f.teacher_pred or {}).items()})
    arrays.update({f"i/{k}": v for k, v in f.train_ids.items()})
    arrays["result_json"] = np.array(json.dumps(f.result, default=float))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_fitted(path: Path) -> Fitted:
    with np.load(path, allow_pickle=False) as z:
        part = lambda prefix: {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}
        teacher = part("t/")
        return Fitted(None, None, json.loads(str(z["result_json"])), part("s/"), teacher or None, part("i/"))


def _fit_job(job: tuple) -> Fitted:
    """One fit, models dropped (process-pool worker); cached on disk when `cache_dir` is set."""
    data_dir, cfg, days, eval_day, cache_dir = job
    path = Path(cache_dir) / f"{_job_key(data_dir, cfg, days, eval_day)}.npz" if cache_dir else None
    if path is not None and path.exists():
        return load_fitted(path)
    torch.set_num_threads(1)
    if data_dir not in _DATA:
        _DATA[data_dir] = load(data_dir)
    f = fit(cfg, _DATA[data_dir], days, eval_day)
    light = Fitted(None, None, f.result, f.student_pred, f.teacher_pred, f.train_ids)
    if path is not None:
        save_fitted(path, light)
    return light


class Runner:
    """Runs batches of fits (in `workers` processes) and logs each."""

    def __init__(self, data_dir, data: SimData, base: Config, win: dict, log, workers: int = 1, cache_dir: str = ""):
        self.data_dir, self.data, self.base, self.win, self.log = str(data_dir), data, base, win, log
        self.workers, self.cache_dir = workers, cache_dir

    def cfg(self, **kw) -> Config:
        cfg = dataclasses.replace(self.base, **kw)
        cfg.validate()
        return cfg

    def many(self, specs: list[tuple[str, list[int] | None, dict]]) -> list[Fitted]:
        """specs: (phase "valid" | "test", train days or None for the phase's window, Config changes)."""
        jobs = []
        for phase, days, kw in specs:
            days = days or (self.win["fit"] if phase == "valid" else self.win["train"])
            jobs.append((self.data_dir, self.cfg(**kw), days, self.win[phase], self.cache_dir))
        if self.workers > 1 and len(jobs) > 1:
            ctx = mp.get_context("fork")
            with ctx.Pool(min(self.workers, len(jobs)), maxtasksperchild=4) as pool:
                out = pool.map(_fit_job, jobs, chunksize=1)
        else:
            out = [_fit_job(j) for j in jobs]
        for (phase, _, kw), f in zip(specs, out):
            r = f.result
            self.log(f"  {phase} {kw}: student {r['auc']:.4f} teacher {r.get('teacher_auc', float('nan')):.4f} "
                     f"({r['train_seconds']:.0f}s wall, {r.get('train_cpu_seconds', float('nan')):.0f}s cpu)")
        return out

    def select(self, plan: CoarsePlan, methods: list[tuple[str, dict]]) -> dict:
        """{method key: (chosen Config changes, validation curve)} for (key, Config changes)
        pairs, in one batch of fits: every candidate (each LR of `plan.lrs`; for baseline_wd
        each LR x weight decay) is fitted on the fit window with each of the first
        `plan.select_seeds` seeds and scored on the whole validation day; the best mean wins."""
        seeds = plan.seeds[: plan.select_seeds]
        specs, slots, grids = [], [], {}
        for key, kw in methods:
            if key in plan.selected_lrs:
                continue
            grid = [{"lr": lr} for lr in plan.lrs]
            if key == "baseline_wd":
                grid = [{"lr": lr, "weight_decay": wd} for lr in plan.lrs for wd in plan.weight_decays]
            grids[key] = grid
            if len(grid) == 1:
                continue
            for cand in grid:
                for seed in seeds:
                    specs.append(("valid", None, dict(kw, **cand, seed=seed)))
                    slots.append((key, candidate_key(cand)))
        fits = self.many(specs)
        scores: dict[str, dict[str, list]] = {}
        for (key, label), f in zip(slots, fits):
            scores.setdefault(key, {}).setdefault(label, []).append(float(f.result["auc"]))
        out = {}
        for key, _ in methods:
            if key in plan.selected_lrs:
                out[key] = ({"lr": plan.selected_lrs[key]}, {"given": plan.selected_lrs[key]})
            elif len(grids[key]) == 1:
                out[key] = (grids[key][0], {"fixed": candidate_key(grids[key][0])})
            else:
                best, curve = X.select_by_mean(scores[key])
                out[key] = (next(c for c in grids[key] if candidate_key(c) == best), curve)
        return out


def candidate_key(cand: dict) -> str:
    """A candidate's name in the validation curve: "lr=0.05" or "lr=0.05,weight_decay=0.0001"."""
    return ",".join(f"{k}={v:g}" for k, v in cand.items())


def summary(runs: dict[str, list], base_key: str = "baseline") -> dict:
    """runs[name] = list of Fitted over seeds (same order) -> the results.json `methods` block."""
    out = {}
    base = [f.result["auc"] for f in runs[base_key]] if base_key in runs else None
    for name, fs in runs.items():
        s = [f.result["auc"] for f in fs]
        t = [f.result["teacher_auc"] for f in fs if "teacher_auc" in f.result]
        out[name] = {
            "student_auc": X.mean_std(s),
            "teacher_auc": X.mean_std(t) if t else {"mean": None, "std": None, "n": 0},
            "delta_vs_baseline": X.paired_diff(s, base) if base is not None else None,
            "wall_s": float(np.mean([f.result["train_seconds"] for f in fs])),
            "cpu_s": float(np.mean([f.result.get("train_cpu_seconds", float("nan")) for f in fs])),
            "calibration": X.mean_std([f.result["calibration"] for f in fs]),
            "per_seed": s,
        }
    return out


def ceiling(runs: dict[str, list]) -> dict:
    return X.mean_std([f.result["ceiling_auc"] for fs in runs.values() for f in fs[:1]] or [float("nan")])


def bucket_deltas(runs: dict[str, list]) -> dict:
    """Paired AUC differences to the baseline within head / torso / tail users and items."""
    out = {}
    base = runs["baseline"]
    for field in ("user_id", "item_id"):
        labels = [X.frequency_buckets(f.train_ids[field], f.student_pred[field]) for f in base]
        out[field] = {}
        for name, fs in runs.items():
            out[field][name] = {}
            for b in ("head", "torso", "tail"):
                per_seed_m, per_seed_b = [], []
                for k, (f, fb) in enumerate(zip(fs, base)):
                    m = labels[k] == b
                    per_seed_m.append(metrics.auc(f.student_pred["click"][m], f.student_pred["logit"][m]))
                    per_seed_b.append(metrics.auc(fb.student_pred["click"][m], fb.student_pred["logit"][m]))
                share = float(np.mean(labels[0] == b))
                out[field][name][b] = {"auc": X.mean_std(per_seed_m), "delta": X.paired_diff(per_seed_m, per_seed_b),
                                       "share_of_test_rows": share}
    return out




def teacher_variants(r: Runner, plan: CoarsePlan, seeds, teacher: str, select_kw: dict,
                     variants: list[tuple[str, dict]]) -> tuple[dict, dict]:
    """The baseline and `teacher` under each variant's Config changes (a λ, a manner), every
    variant at the teacher's LR chosen with `select_kw`; -> (methods summary, the rest of the results: ceiling, teacher, lrs, selection).
    `variants`: (row name, Config changes)."""
    sel = r.select(plan, [("baseline", {"teacher": "baseline"}), (teacher, {"teacher": teacher, **select_kw})])
    chosen = {k: v[0] for k, v in sel.items()}
    specs = [("test", None, dict(teacher="baseline", **chosen["baseline"], seed=s)) for s in seeds]
    specs += [("test", None, dict(teacher=teacher, **kw, **chosen[teacher], seed=s)) for _, kw in variants for s in seeds]
    fits = iter(r.many(specs))
    runs = {"baseline": [next(fits) for _ in seeds]}
    for name, _ in variants:
        runs[name] = [next(fits) for _ in seeds]
    methods = summary(runs)
    for k in methods:
        methods[k]["lr"] = chosen["baseline" if k == "baseline" else teacher]["lr"]
    return methods, {"ceiling_auc": ceiling(runs), "teacher": teacher, "lrs": {k: c["lr"] for k, c in chosen.items()},
                     "lr_selection": {k: v[1] for k, v in sel.items()}}
