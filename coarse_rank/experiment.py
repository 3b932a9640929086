"""Coarse-ranker distillation experiments (PFD Tables 2, 5 and 7) under the shared protocol.

    from coarse_rank.experiment import run
    results = run("coarse", "data/small7", "docs/results/coarse")        # Table 2 + items 4-5
    results = run("lambda", "data/small7", "docs/results/lambda")        # Table 5
    results = run("manner", "data/small7", "docs/results/manner")        # Table 7 (with wall time)

Protocol (DESIGN §6), the same for every method, the baseline included:

1. Learning rate: each method trains on the fit window (the `base_days` days before the
   validation day) with every LR of `lrs` (first seed) and keeps the one with the best
   student AUC on the validation day (day D-1). The test day is not touched.
2. Test: each method retrains with its LR on the train window (the `base_days` days before
   the test day D) for every seed and is scored once on day D.
3. Paired differences to the baseline over seeds (same seed = same init and data order)
   with 95 % t-intervals (recstack.evaluation.protocol.paired_diff).
4. Sample efficiency (coarse only): the baseline at 0.25x / 0.5x (seeded share of the train
   window's sessions), 1x, and 2x (the 2 * base_days days before the test day: more days of
   the same world, so the test day and its users are unchanged; needs D >= 2 * base_days + 1
   and is skipped, with a note, otherwise). Each method's data-equivalent multiplier is read
   off that curve.
5. Gains by id frequency (coarse only): test rows bucketed head / torso / tail by their
   user's and their item's frequency in the train window.
6. Control (coarse only, when `control_data` is given): the same world simulated with
   privileged_strength=0; baseline, PFD and PFD+MD with the LRs selected on the main world.

Experiment keys accepted in `overrides` besides any `coarse_rank.train.Config` field:
lrs=0.025,0.05,0.1  base_days=3  methods=baseline,pfd  lams=0.1,0.5  manners=ind_sync,...
fractions=0.25,0.5  double=false  control_methods=baseline,pfd  workers=3  cache=DIR
control_data=PATH  selected_lrs=baseline:0.05,pfd_md:0.1 (skip the sweep for those methods).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from recstack.evaluation import protocol as X
from recstack.evaluation import metrics
from recstack.config import ConfigError, apply_overrides
from recstack.data import SimData, load

from coarse_rank.train import MANNERS, TEACHERS, Config, Fitted, fit

NAMES = ("coarse", "lambda", "manner")
PAPER = {  # PFD Table 2 (1 day, CTR at coarse ranking), student testing AUC
    "baseline": 0.6625, "lupi": 0.6645, "md": 0.6677, "pfd": 0.6712, "pfd_md": 0.6745,
}
PAPER_10D_GAIN = 0.0118  # PFD+MD vs baseline on 10 days (Table 2, right)
QUICK = dict(embed_dim=8, d_model=32, n_heads=4, ff_dim=64, hidden=(64,), out_dim=32, teacher_hidden=(64, 32),
             batch_size=256, epochs=1, max_steps=12, warmup_steps=4, swap_step=4, eval_max_rows=2000)


@dataclasses.dataclass
class Plan:
    lrs: tuple[float, ...] = (0.025, 0.05, 0.1)
    base_days: int = 3
    methods: tuple[str, ...] = TEACHERS
    lams: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    manners: tuple[str, ...] = MANNERS
    fractions: tuple[float, ...] = (0.25, 0.5)
    control_data: str = ""
    double: bool = True  # run the baseline at 2x (more days) when the world has them
    control_methods: tuple[str, ...] = ("baseline", "pfd", "pfd_md")
    workers: int = 0  # set through overrides (`recstack experiment ... --set workers=3`); 0 = the run() argument
    cache: str = ""  # likewise for cache_dir
    selected_lrs: dict = dataclasses.field(default_factory=dict)


def _split_overrides(overrides: Sequence[str], quick: bool) -> tuple[Plan, Config]:
    plan, rest = Plan(), []
    if quick:
        plan = dataclasses.replace(plan, lrs=(0.05,), lams=(0.3, 0.7), fractions=(0.5,))
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if key in ("lrs", "lams", "fractions"):
            setattr(plan, key, tuple(float(v) for v in value.split(",") if v.strip()))
        elif key in ("methods", "manners", "control_methods"):
            setattr(plan, key, tuple(v.strip() for v in value.split(",") if v.strip()))
        elif key == "base_days":
            plan.base_days = int(value)
        elif key == "double":
            plan.double = value.strip().lower() in ("1", "true", "yes")
        elif key == "workers":
            plan.workers = int(value)
        elif key == "cache":
            plan.cache = value
        elif key == "control_data":
            plan.control_data = value
        elif key == "selected_lrs":
            plan.selected_lrs = {k: float(v) for k, v in (p.split(":") for p in value.split(",") if p.strip())}
        else:
            rest.append(item)
    bad = [m for m in plan.methods if m not in TEACHERS] + [m for m in plan.manners if m not in MANNERS]
    if bad:
        raise ConfigError(f"unknown methods/manners {bad}")
    # one full epoch over every window (no step cap), so 2x data really is twice the updates
    base = Config(**QUICK) if quick else Config(max_steps=0)
    return plan, apply_overrides(base, rest)


def windows(data: SimData, base_days: int) -> dict:
    """Day windows: fit (LR sweep) -> valid day, train -> test day, and the 2x window if the
    world has enough days."""
    d = data.n_days
    valid, test = d - 1, d
    fit_days = list(range(max(1, valid - base_days), valid))
    train_days = list(range(max(1, test - base_days), test))
    double = list(range(test - 2 * len(train_days), test)) if test - 2 * len(train_days) >= 1 else None
    return {"fit": fit_days, "valid": valid, "train": train_days, "test": test, "double": double}


def _job_key(data_dir: str, cfg: Config, days: list[int], eval_day: int) -> str:
    fields = dataclasses.asdict(cfg)
    if not fields.get("stream_chunk_rows"):
        fields.pop("stream_chunk_rows", None)  # in-memory fits keep the keys of caches written before the field
    blob = json.dumps([str(Path(data_dir).resolve()), fields, list(days), int(eval_day)], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


_DATA: dict[str, SimData] = {}


def _save_fitted(path: Path, f: Fitted) -> None:
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


def _load_fitted(path: Path) -> Fitted:
    with np.load(path, allow_pickle=False) as z:
        part = lambda prefix: {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}
        teacher = part("t/")
        return Fitted(None, None, json.loads(str(z["result_json"])), part("s/"), teacher or None, part("i/"))


def _fit_job(job: tuple) -> Fitted:
    """One fit, models dropped (process-pool worker); cached on disk when `cache_dir` is set."""
    data_dir, cfg, days, eval_day, cache_dir = job
    path = Path(cache_dir) / f"{_job_key(data_dir, cfg, days, eval_day)}.npz" if cache_dir else None
    if path is not None and path.exists():
        return _load_fitted(path)
    torch.set_num_threads(1)
    if data_dir not in _DATA:
        _DATA[data_dir] = load(data_dir)
    f = fit(cfg, _DATA[data_dir], days, eval_day)
    light = Fitted(None, None, f.result, f.student_pred, f.teacher_pred, f.train_ids)
    if path is not None:
        _save_fitted(path, light)
    return light


class _Runner:
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

    def select(self, plan: Plan, methods: list[tuple[str, dict]], seed: int) -> dict:
        """{method key: (lr, {lr: validation AUC})} for (key, Config changes) pairs; one batch of fits."""
        specs, slots = [], []
        for key, kw in methods:
            if key in plan.selected_lrs or len(plan.lrs) == 1:
                continue
            for lr in plan.lrs:
                specs.append(("valid", None, dict(kw, lr=lr, seed=seed)))
                slots.append((key, lr))
        fits = self.many(specs)
        scores: dict[str, dict] = {}
        for (key, lr), f in zip(slots, fits):
            scores.setdefault(key, {})[float(lr)] = float(f.result["auc"])
        out = {}
        for key, _ in methods:
            if key in plan.selected_lrs:
                out[key] = (plan.selected_lrs[key], {"given": plan.selected_lrs[key]})
            elif len(plan.lrs) == 1:
                out[key] = (plan.lrs[0], {"fixed": plan.lrs[0]})
            else:
                out[key] = X.select_lr(lambda lr, k=key: scores[k][float(lr)], plan.lrs)
        return out


def _summary(runs: dict[str, list], base_key: str = "baseline") -> dict:
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


def _ceiling(runs: dict[str, list]) -> dict:
    return X.mean_std([f.result["ceiling_auc"] for fs in runs.values() for f in fs[:1]] or [float("nan")])


def _bucket_deltas(runs: dict[str, list]) -> dict:
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


def _table(methods: dict, extra_cols=()) -> str:
    rows = []
    for name, m in methods.items():
        d = m["delta_vs_baseline"]
        t = m["teacher_auc"]
        row = [name, f"{m['student_auc']['mean']:.4f} ± {m['student_auc']['std']:.4f}",
               f"{t['mean']:.4f} ± {t['std']:.4f}" if t["mean"] is not None else "—",
               X.fmt_ci(d) if d and name != "baseline" else "—", f"{m['wall_s']:.1f}"]
        row += [c(name, m) for c in extra_cols]
        rows.append(row)
    return rows


def run(name: str, data_dir, out_dir, seeds=(1, 2, 3), quick: bool = False, overrides=(), *,
        workers: int = 1, cache_dir: str | Path | None = None) -> dict:
    """Run experiment `name` ("coarse", "lambda" or "manner") on the world in `data_dir`;
    writes report.md, results.json and PNG plots to `out_dir` and returns the results.

    `workers` > 1 runs independent fits in that many processes (one thread each); a
    `cache_dir` keeps every fit's metrics and predictions keyed by (world, config, days), so
    runs shared by the tables (e.g. PFD+MD at λ = 0.5, Share&Sync) are trained once."""
    if name not in NAMES:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {NAMES}")
    torch.set_num_threads(1)
    seeds = tuple(int(s) for s in seeds)
    plan, base = _split_overrides(list(overrides), quick)
    workers = plan.workers or workers
    cache_dir = plan.cache or cache_dir
    data = load(data_dir)
    win = windows(data, plan.base_days)
    if not win["fit"]:
        raise ConfigError(f"a {data.n_days}-day world leaves no fit days before the validation day")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        if not quick:
            print(msg, flush=True)

    t0 = time.perf_counter()
    runner = _Runner(data_dir, data, base, win, log, workers, str(cache_dir or ""))
    common = {
        "experiment": name, "data_dir": str(Path(data_dir).resolve()), "world": data.world.get("config", {}),
        "preset": data.world.get("preset"), "seeds": list(seeds), "quick": quick, "windows": win,
        "plan": dataclasses.asdict(plan), "config": dataclasses.asdict(base),
    }
    if name == "coarse":
        res = _coarse(runner, plan, seeds, out, data_dir)
    elif name == "lambda":
        res = _lambda(runner, plan, seeds, out)
    else:
        res = _manner(runner, plan, seeds, out)
    res.update(common)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    res["workers"] = workers
    res["log"] = lines
    X.write_results(out, res)
    (out / "report.md").write_text(_report(name, res))
    return res


# --- the three experiments ----------------------------------------------------------------


def _coarse(r: _Runner, plan: Plan, seeds, out: Path, data_dir) -> dict:
    sel = r.select(plan, [(m, {"teacher": m}) for m in plan.methods], seeds[0])
    lrs = {m: sel[m][0] for m in plan.methods}
    # every test-day fit in one batch: methods x seeds, the baseline's data curve, the control
    specs = [("test", None, dict(teacher=m, lr=lrs[m], seed=s)) for m in plan.methods for s in seeds]
    specs += [("test", None, dict(teacher="baseline", lr=lrs["baseline"], seed=s, train_fraction=f))
              for f in plan.fractions for s in seeds]
    notes = []
    do_double = bool(r.win["double"]) and plan.double
    if do_double:
        specs += [("test", r.win["double"], dict(teacher="baseline", lr=lrs["baseline"], seed=s)) for s in seeds]
    elif plan.double:
        notes.append(f"2x skipped: a {r.data.n_days}-day world has no {2 * len(r.win['train'])} days before the test day")
    fits = iter(r.many(specs))
    runs = {m: [next(fits) for _ in seeds] for m in plan.methods}
    curve = {1.0: [f.result["auc"] for f in runs["baseline"]]}
    for f in plan.fractions:
        curve[f] = [next(fits).result["auc"] for _ in seeds]
    if do_double:
        curve[2.0] = [next(fits).result["auc"] for _ in seeds]
    control = None
    if plan.control_data:
        cdata = load(plan.control_data)
        cr = _Runner(plan.control_data, cdata, r.base, windows(cdata, plan.base_days), r.log, r.workers, r.cache_dir)
        cm = [m for m in plan.control_methods if m in lrs]
        cfits = iter(cr.many([("test", None, dict(teacher=m, lr=lrs[m], seed=s)) for m in cm for s in seeds]))
        cruns = {m: [next(cfits) for _ in seeds] for m in cm}
        control = {"data_dir": str(Path(plan.control_data).resolve()), "lrs": "selected on the main world",
                   "world": cdata.world.get("config", {}), "methods": _summary(cruns), "ceiling_auc": _ceiling(cruns)}

    methods = _summary(runs)
    for m in methods:
        methods[m]["lr"] = lrs[m]
        methods[m]["valid_auc_by_lr"] = sel[m][1]
    fr = sorted(curve)
    base_curve = [float(np.mean(curve[f])) for f in fr]
    for m in methods:
        methods[m]["data_multiplier"] = X.data_equivalent_multiplier(fr, base_curve, methods[m]["student_auc"]["mean"])
    X.plot_curves(out / "sample_efficiency.png", fr, {"baseline": base_curve, **{
        f"{m} (1x)": [methods[m]["student_auc"]["mean"]] * len(fr) for m in methods if m != "baseline"}},
        "Baseline AUC vs training data; lines: methods at 1x", "training data (x the train window)", "test AUC", logx=True)
    X.plot_bars_with_ci(out / "delta_vs_baseline.png", [m for m in methods if m != "baseline"],
                        [methods[m]["delta_vs_baseline"] for m in methods if m != "baseline"],
                        "Coarse student: AUC − baseline (paired, 95% CI)")
    buckets = _bucket_deltas(runs)
    for field in buckets:
        names = [m for m in methods if m != "baseline"]
        plt = X._plt()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, b in enumerate(("head", "torso", "tail")):
            ds = [buckets[field][m][b]["delta"] for m in names]
            means = [d["mean"] for d in ds]
            err = np.nan_to_num(np.array([[d["mean"] - d["ci95"][0], d["ci95"][1] - d["mean"]] for d in ds]).T)
            ax.bar(np.arange(len(names)) + (k - 1) * 0.27, means, width=0.27, yerr=err, capsize=2, label=b)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("AUC − baseline")
        ax.set_title(f"Gain by {field.split('_')[0]} frequency (paired, 95% CI)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"buckets_{field.split('_')[0]}.png", dpi=120)
        plt.close(fig)
    return {"methods": methods, "ceiling_auc": _ceiling(runs), "sample_efficiency": {
        "fractions": fr, "baseline_auc": {str(f): X.mean_std(curve[f]) for f in fr},
        "how": "0.25x / 0.5x: a seeded share of the train window's sessions; 2x: the 2 * base_days days before "
               "the test day (more days of the same world; same test day and users)", "notes": notes},
        "buckets": buckets, "control": control}


def _lambda(r: _Runner, plan: Plan, seeds, out: Path) -> dict:
    teacher = "pfd_md"
    sel = r.select(plan, [("baseline", {"teacher": "baseline"}), (teacher, {"teacher": teacher, "lam": 0.5})], seeds[0])
    lrs = {k: v[0] for k, v in sel.items()}
    specs = [("test", None, dict(teacher="baseline", lr=lrs["baseline"], seed=s)) for s in seeds]
    specs += [("test", None, dict(teacher=teacher, lam=lam, lr=lrs[teacher], seed=s)) for lam in plan.lams for s in seeds]
    fits = iter(r.many(specs))
    runs = {"baseline": [next(fits) for _ in seeds]}
    for lam in plan.lams:
        runs[f"{teacher}_lam{lam:g}"] = [next(fits) for _ in seeds]
    methods = _summary(runs)
    for k in methods:
        methods[k]["lr"] = lrs["baseline" if k == "baseline" else teacher]
    X.plot_curves(out / "lambda.png", list(plan.lams), {
        f"{teacher} student": [methods[f"{teacher}_lam{l:g}"]["student_auc"]["mean"] for l in plan.lams],
        "baseline": [methods["baseline"]["student_auc"]["mean"]] * len(plan.lams)},
        "Student test AUC vs λ (PFD Table 5)", "λ", "test AUC")
    return {"methods": methods, "ceiling_auc": _ceiling(runs), "teacher": teacher, "lrs": lrs,
            "lr_selection": {k: v[1] for k, v in sel.items()}}


def _manner(r: _Runner, plan: Plan, seeds, out: Path) -> dict:
    teacher = "pfd_md"
    sel = r.select(plan, [("baseline", {"teacher": "baseline"}), (teacher, {"teacher": teacher})], seeds[0])
    lrs = {k: v[0] for k, v in sel.items()}
    specs = [("test", None, dict(teacher="baseline", lr=lrs["baseline"], seed=s)) for s in seeds]
    specs += [("test", None, dict(teacher=teacher, manner=m, lr=lrs[teacher], seed=s)) for m in plan.manners for s in seeds]
    fits = iter(r.many(specs))
    runs = {"baseline": [next(fits) for _ in seeds]}
    for m in plan.manners:
        runs[f"{teacher}_{m}"] = [next(fits) for _ in seeds]
    methods = _summary(runs)
    base_wall = methods["baseline"]["wall_s"]
    base_cpu = methods["baseline"]["cpu_s"]
    for k in methods:
        methods[k]["lr"] = lrs["baseline" if k == "baseline" else teacher]
        methods[k]["wall_ratio_vs_baseline"] = methods[k]["wall_s"] / base_wall
        methods[k]["cpu_ratio_vs_baseline"] = methods[k]["cpu_s"] / base_cpu
    names = [k for k in methods if k != "baseline"]
    X.plot_bars_with_ci(out / "manner.png", names, [methods[k]["delta_vs_baseline"] for k in names],
                        "PFD+MD student by training manner: AUC − baseline")
    plt = X._plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(len(methods)), [methods[k]["cpu_s"] for k in methods], color="tab:blue")
    ax.set_xticks(range(len(methods)), list(methods), rotation=30, ha="right")
    ax.set_ylabel("training CPU time (s, 1 thread)")
    ax.set_title("Training cost per run")
    fig.tight_layout()
    fig.savefig(out / "wall_time.png", dpi=120)
    plt.close(fig)
    return {"methods": methods, "ceiling_auc": _ceiling(runs), "teacher": teacher, "lrs": lrs,
            "lr_selection": {k: v[1] for k, v in sel.items()}}


# --- report ------------------------------------------------------------------------------


def _lr_text(plan: dict) -> str:
    given = plan.get("selected_lrs") or {}
    text = f"LR sweep {list(plan['lrs'])} on the first seed"
    if given:  # rates chosen by an earlier sweep (in the report that ran it) are not re-swept here
        text += f", except the rates given by `selected_lrs` {given}, chosen earlier on the same validation window"
    return text


def _report(name: str, res: dict) -> str:
    w = res["windows"]
    world = res.get("world") or {}
    head = [
        f"# Coarse ranker — experiment `{name}` on the `{res['preset']}` world"
        + (" (QUICK smoke run: not a result)" if res["quick"] else ""),
        "",
        f"World: `{res['preset']}` preset, {res['data_dir']} "
        f"(n_days={world.get('n_days')}, privileged_strength={world.get('privileged_strength')}). "
        f"Seeds {res['seeds']}. {_lr_text(res['plan'])}: fit days {w['fit']} → "
        f"validation day {w['valid']}; test: train days {w['train']} → test day {w['test']} (touched once per run). "
        f"Total {res['total_seconds'] / 60:.1f} min wall ({res.get('workers', 1)} worker process(es), one thread each, "
        f"on a machine shared with other jobs: compare costs by CPU seconds, not wall seconds; fits found in "
        f"the --cache were reused, not re-run, and are not in this total).",
        "",
        f"Ground-truth ceiling AUC on the test day (true pCTR vs clicks): {res['ceiling_auc']['mean']:.4f}.",
        "",
    ]
    methods = res["methods"]
    cols = [lambda n, m: f"{m.get('lr', float('nan')):g}"]
    cols.insert(0, lambda n, m: f"{m.get('cpu_s', float('nan')):.1f}")
    hdr = ["method", "student AUC (mean ± std)", "teacher AUC", "Δ vs baseline [95% CI]", "wall s", "CPU s", "LR"]
    if name == "coarse":
        cols.append(lambda n, m: ("%.2fx" % m["data_multiplier"]["multiplier"]) + (" (extrapolated)" if m["data_multiplier"].get("extrapolated") else ""))
        hdr.append("data-equiv. multiplier")
        cols.append(lambda n, m: f"{PAPER[n]:.4f}" if n in PAPER else "—")
        hdr.append("paper (1 day)")
    if name == "manner":
        cols.append(lambda n, m: f"{m['wall_ratio_vs_baseline']:.2f}x / {m['cpu_ratio_vs_baseline']:.2f}x")
        hdr.append("wall / CPU vs baseline")
    body = ["## Results", "", X.markdown_table(hdr, _table(methods, cols)), ""]
    if name == "coarse":
        se = res["sample_efficiency"]
        body += ["## Sample efficiency (baseline)", "",
                 X.markdown_table(["data", "baseline AUC"], [[f"{f:g}x", f"{se['baseline_auc'][str(f)]['mean']:.4f} ± {se['baseline_auc'][str(f)]['std']:.4f}"] for f in se["fractions"]]),
                 "", *[f"- {n}" for n in se["notes"]], "",
                 "![sample efficiency](sample_efficiency.png) ![delta](delta_vs_baseline.png)", "",
                 "## Gains by id frequency (paired Δ vs baseline within the bucket)", ""]
        for field, tab in res["buckets"].items():
            names = list(tab)
            shares = {b: tab[names[0]][b]["share_of_test_rows"] for b in ("head", "torso", "tail")}
            body += [f"{field.split('_')[0]}s (share of test rows: " + ", ".join(f"{b} {s:.2f}" for b, s in shares.items()) + ")", "",
                     X.markdown_table(["method", "head", "torso", "tail"],
                                      [[n] + [X.fmt_ci(tab[n][b]["delta"]) for b in ("head", "torso", "tail")] for n in names if n != "baseline"]),
                     "", f"![{field}](buckets_{field.split('_')[0]}.png)", ""]
        if res["control"]:
            c = res["control"]
            body += [f"## Control: privileged_strength = {c['world'].get('privileged_strength')} ({c['data_dir']})", "",
                     X.markdown_table(["method", "student AUC", "teacher AUC", "Δ vs baseline [95% CI]"],
                                      [[n, f"{m['student_auc']['mean']:.4f} ± {m['student_auc']['std']:.4f}",
                                        f"{m['teacher_auc']['mean']:.4f}" if m["teacher_auc"]["mean"] is not None else "—",
                                        X.fmt_ci(m["delta_vs_baseline"]) if n != "baseline" else "—"] for n, m in c["methods"].items()]), ""]
        body += ["## Validation sweep (student AUC on the validation day, first seed)", "",
                 X.markdown_table(["method", "AUC by LR", "chosen"], [[n, ", ".join(f"{k}: {v:.4f}" for k, v in m["valid_auc_by_lr"].items()), f"{m['lr']:g}"] for n, m in methods.items()]), ""]
    elif name == "lambda":
        body += ["![lambda](lambda.png)", ""]
    else:
        body += ["![manner](manner.png) ![wall time](wall_time.png)", ""]
    return "\n".join(head + body + ["<!-- discussion -->", ""])


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=NAMES)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cache", default=None, help="directory caching every fit's results (reused across tables)")
    args = ap.parse_args()
    res = run(args.name, args.data, args.out, seeds=[int(s) for s in args.seeds.split(",")], quick=args.quick,
              overrides=args.overrides, workers=args.workers, cache_dir=args.cache)
    print(json.dumps({k: v["student_auc"]["mean"] for k, v in res["methods"].items()}, indent=1))
