"""PFD for CVR: PFD Table 4 (teachers with post-event features, and the controls) and Table 6
(the students' test AUC as λ varies)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from recstack.evaluation import metrics as M
from recstack.evaluation import protocol as X
from recstack.evaluation import report as R

from fine_rank import train as T
from fine_rank.experiments import report as FR
from fine_rank.experiments.plan import CVR_METHODS, LAMBDAS, QUICK_LAMBDAS, FinePlan, Method
from fine_rank.experiments.runs import Tables, run_many
from fine_rank.experiments.table import run_table, strip

NOTES = [
    "Scale: the CVR model learns from the clicked impressions of a few simulated days (the counts are in "
    "the table), the paper's from 1.4e10 clicks. The data curve shows how much the baseline still gains from "
    "more rows, i.e. how much room sample efficiency has.",
    "Post-event features: in the simulator (`recstack/world/simulate.py`) dwell, comments, chat and cart follow "
    "a mix of the realised purchase and the latent purchase propensity (the centred true purchase logit; the world's "
    "`post_event_propensity` sets the mix, `post_event_strength` the scale), dwell, comments and chat also the "
    "price, plus noise. The teacher's soft label estimates P(purchase | regular, post-event), whose mean given "
    "the regular features is the student's own target: distillation helps by lowering the variance of the "
    "training target, more the more the features reveal the propensity rather than the realised label.",
    "LUPI's teacher does not see the price while dwell and comments grow with it, PFD §4's argument for "
    "adding the regular features to the teacher; the λ table shows what that does to its student as λ grows. "
    "How far they grow with it is the world's `post_event_price_penalty`: at 1 the propensity they follow "
    "already falls with price and nearly cancels the push, at 0 it does not and dear items are looked at longer "
    "while they sell less (the world's `world.json` records the value).",
    "MD and PFD+MD teachers are CPU-sized (`cvr_md_hidden`, default 1024-512-512-256-128; the paper: 7 layers "
    "8192..128). Teachers share the student's embeddings (Share&Sync), so they also train those embeddings "
    "with their own log-loss, except in the Ind rows of the manner table (`cvr_manner`).",
]


def lambda_sweep(methods: Sequence[Method], chosen: dict, tables: Tables, base: T.Config, seeds: Sequence[int],
                 lambdas: Sequence[float], main: dict, log, workers: int = 1) -> dict:
    """PFD Table 6: students' test AUC at each λ (each method at its chosen LR; λ = 0.5 reused)."""
    base_auc = main["baseline"]["student_auc_per_seed"]
    reuse = lambda lam: abs(lam - 0.5) < 1e-9 and base.distill_lambda == 0.5  # noqa: E731
    slots = [(m, lam, seed) for m in methods for lam in lambdas if not reuse(lam) for seed in seeds]
    outs = run_many(tables, [(m, base, "test", chosen[m.name], seed, 1.0, (f"distill_lambda={lam}",))
                             for m, lam, seed in slots], workers)
    got = {(m.name, lam, seed): M.auc(tables.test.score["cvr"]["purchase"], o["probs"]) for (m, lam, seed), o in zip(slots, outs)}
    out = {}
    for m in methods:
        out[m.name] = {}
        for lam in lambdas:
            aucs = main[m.name]["student_auc_per_seed"] if reuse(lam) else [got[(m.name, lam, seed)] for seed in seeds]
            out[m.name][str(lam)] = {"student_auc": X.mean_std(aucs), "delta_vs_baseline": X.paired_diff(aucs, base_auc)}
            log(f"  [cvr] λ={lam} {m.name}: AUC {np.mean(aucs):.4f}")
    return out


# PFD Table 8 (CVR, 30 days): row, manner, the paper's student and teacher AUC and relative wall time
MANNER_ROWS = (("baseline", "Baseline", 0.9040, None, 0.0), ("pfd_md_ind_async", "Ind&Async", 0.9067, 0.9887, 1.197),
               ("pfd_md_ind_sync", "Ind&Sync", 0.9069, 0.9887, 0.674), ("pfd_md", "Share&Sync", 0.9082, 0.9911, 0.225),
               ("pfd", "Share&Sync† (PFD)", 0.9084, 0.9901, 0.036))


def manner_section(e: dict) -> list[str]:
    """PFD Table 8 from the rows present: PFD+MD in each manner beside PFD, with the paired
    Share − Ind contrasts (empty without an Ind row)."""
    if not any(name in e for name in ("pfd_md_ind_sync", "pfd_md_ind_async")):
        return []
    base_s = e["baseline"]["wall_s"] if "baseline" in e else None
    rows = []
    for name, manner, paper_s, paper_t, paper_rel in MANNER_ROWS:
        if name not in e:
            continue
        m = e[name]
        rel = "–" if not base_s else f"{m['wall_s'] / base_s - 1:+.0%}"
        rows.append([manner, name, R.fmt_mean_std(m["student_auc"]), R.fmt_ci(m["delta_vs_baseline"]),
                     R.fmt_mean_std(m.get("teacher_auc")), f"{m['lr']:g}", f"{m['wall_s']:.1f} ({rel})",
                     f"{paper_s:.4f}", "–" if paper_t is None else f"{paper_t:.4f}", f"{paper_rel:+.1%}"])
    lines = ["## Training manners — PFD Table 8\n",
             "PFD+MD with the teacher's input components shared (Share&Sync, the `pfd_md` row) or its own (Ind): "
             "trained alongside the student (Sync) or first and then frozen (Async), beside PFD. Wall time is one "
             "fit's (mean over the test seeds), relative to the baseline's.\n",
             R.markdown_table(["manner", "row", "student AUC", "Δ vs baseline [95% CI]", "teacher AUC", "LR", "train s",
                               "paper student", "paper teacher", "paper time"], rows), ""]
    for a, b in (("pfd_md", "pfd_md_ind_sync"), ("pfd_md", "pfd_md_ind_async"), ("pfd_md_ind_sync", "pfd_md_ind_async"),
                 ("pfd", "pfd_md")):
        if a in e and b in e:
            d = X.paired_diff(e[a]["student_auc_per_seed"], e[b]["student_auc_per_seed"])
            lines.append(f"- {a} − {b}: {R.fmt_ci(d)} (paired over seeds)")
    return lines + [""]


def targets(e: dict) -> list[str]:
    """The CVR target lines for the rows present (`methods=` may run a subset)."""
    lines = []
    if "pfd" in e:
        lines.append(f"- PFD > baseline with the CI excluding 0: Δ {R.fmt_ci(e['pfd']['delta_vs_baseline'])} → "
                     f"excludes 0: {FR.excludes_zero(e['pfd']['delta_vs_baseline'])} (paper +0.0044).")
    if "pfd_lam" in e:
        lines.append(f"- PFD with λ chosen on the validation day ({', '.join(e['pfd_lam']['chosen_settings'])}): "
                     f"Δ {R.fmt_ci(e['pfd_lam']['delta_vs_baseline'])} → excludes 0: "
                     f"{FR.excludes_zero(e['pfd_lam']['delta_vs_baseline'])}.")
    if "lupi" in e:
        lines.append(f"- LUPI below the baseline with the CI excluding 0: Δ {R.fmt_ci(e['lupi']['delta_vs_baseline'])} → "
                     f"below 0: {'yes' if e['lupi']['delta_vs_baseline']['ci95'][1] < 0 else 'no'} (paper −0.0075).")
    if "lupi" in e and "pfd" in e:
        lines.append(f"- LUPI < PFD: LUPI {e['lupi']['student_auc']['mean']:.4f} vs PFD {e['pfd']['student_auc']['mean']:.4f}.")
    if "mtl" in e:
        lines.append(f"- MTL (the paper: the baseline's, +0.0005): Δ {R.fmt_ci(e['mtl']['delta_vs_baseline'])}.")
    if "sd" in e:
        lines.append(f"- SD control (soft labels without privileged information): Δ {R.fmt_ci(e['sd']['delta_vs_baseline'])}.")
    cut = [m.name for m in CVR_METHODS if m.name not in e]
    if cut:
        lines.append(f"- not run in this table (`methods=`, a CPU cut): {', '.join(cut)}.")
    return lines


def run(plan: FinePlan, tables: Tables, base: T.Config, out: Path, log: Callable[[str], None]) -> tuple[dict, list[str]]:
    """PFD Tables 4 and 6; -> (results.json entries, report sections)."""
    table = run_table("cvr", plan.rows("cvr"), tables, base, plan.seeds, plan.lrs, plan.data_fractions(), log, plan.workers,
                      plan.n_select_seeds())
    lam_methods = [m for m in plan.rows("cvr") if m.name in ("lupi", "pfd")]
    lambdas = QUICK_LAMBDAS if plan.quick else LAMBDAS
    lam = lambda_sweep(lam_methods, table["_chosen"], tables, base, plan.seeds, lambdas, table["methods"], log, plan.workers)
    results = {**strip(table), "lambda": lam}
    e = table["methods"]
    files = FR.plots(out, "cvr", table, "CVR (PFD Table 4)")
    lam_series = {m: [lam[m][str(l)]["student_auc"]["mean"] for l in lambdas] for m in lam}
    lam_series["baseline"] = [e["baseline"]["student_auc"]["mean"]] * len(lambdas)
    files.append(R.plot_curves(out / "cvr_lambda.png", lambdas, lam_series, "CVR students vs λ (PFD Table 6)", "λ", "test AUC").name)
    lam_rows = [[str(l)] + [f"{lam[m][str(l)]['student_auc']['mean']:.4f} ({R.fmt_ci(lam[m][str(l)]['delta_vs_baseline'])})"
                            for m in lam] for l in lambdas]
    sections = [
        "## CVR with privileged (post-event) features — PFD Table 4\n",
        f"CVR is trained on the clicked impressions ({table['n_train']} training rows, {table['n_test']} test rows, "
        f"test purchase rate {table['test_positive_rate']:.3f}). Teachers train synchronously with the student "
        f"(Eq. 5, λ = {base.distill_lambda}, λ = 0 for the first {base.distill_warmup:.0%} of steps, teacher detached "
        f"in L_d) and share its embeddings; only the student is exported.\n",
        FR.methods_table(e, "cvr"), "",
        "Gains by the item's training frequency (head = items holding the first 20 % of training rows, torso the "
        "next 50 %, tail the rest and unseen items):\n",
        FR.buckets_table(e, table["bucket_rows"]), "",
        *manner_section(e),
        "## λ sensitivity — PFD Table 6\n",
        R.markdown_table(["λ"] + list(lam), lam_rows), "",
        "## Against the issue's targets\n",
        *targets(e),
        f"- Best method on the validation day (the selection rule for the default config): "
        f"{max(e, key=lambda n: e[n]['validation_auc'] or -1)}.",
        "", "Plots: " + ", ".join(f"`{f}`" for f in files),
    ]
    return results, sections + FR.notes_section(NOTES)
