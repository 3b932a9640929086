"""The fine rankers with and without the behaviour sequence (`ctr_sequence` / `cvr_sequence`),
paired by seed: held-out AUC and calibration of CTR and CVR per variant, and the paired
difference to "none" with its 95 % interval.

    python -m fine_rank.experiments.sequence --data data/small --out runs/fine_sequence --split valid --seeds 1,2,3

Each (variant, seed) is one `fine_rank.train.train` run in OUT/<split>/<variant>/seed<N>/, its
checkpoint (with its metrics) kept; a run whose checkpoint exists is read, not retrained, so
the sweep resumes where it stopped. Choose on `--split valid`, then report `--split test`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from recstack.evaluation.protocol import mean_std, paired_diff

from fine_rank.config import STAGE, TASKS, Config
from fine_rank.sequence import SEQUENCES

MEASURES = ("auc", "calibration", "logloss")


def run_one(data_dir: str | Path, out: Path, split: str, variant: str, seed: int) -> dict:
    """One training run (or its saved metrics): the held-out metrics of both models."""
    done = out / "checkpoint.pt"
    if done.exists():
        from recstack.training import checkpoint

        return checkpoint.load(done, stage=STAGE)["metrics"]
    from fine_rank.train import train

    cfg = Config(seed=seed, split=split, ctr_sequence=variant, cvr_sequence=variant, item_stats=False)
    return train(cfg, data_dir, out, progress=False)


def summarise(metrics: dict[str, dict[int, dict]], baseline: str = "none") -> dict:
    """{variant: {seed: metrics}} -> per variant and task: mean ± std of each measure, the
    truth's AUC, and (besides the baseline) the paired difference to the baseline."""
    out: dict = {}
    seeds = sorted(metrics[baseline])
    for variant, per_seed in metrics.items():
        row: dict = {}
        for task in TASKS:
            vals = {m: [per_seed[s][task][m] for s in seeds] for m in MEASURES}
            row[task] = {m: mean_std(v) for m, v in vals.items()}
            row[task]["auc_truth"] = mean_std([per_seed[s][task]["auc_truth"] for s in seeds])
            row[task]["train_seconds"] = mean_std([per_seed[s][task]["train"]["train_seconds"] for s in seeds])
            if variant != baseline:
                base = {m: [metrics[baseline][s][task][m] for s in seeds] for m in MEASURES}
                row[task]["vs_baseline"] = {m: paired_diff(vals[m], base[m]) for m in MEASURES}
        out[variant] = row
    return {"seeds": seeds, "baseline": baseline, "variants": out}


def format_report(summary: dict, split: str, eval_day: int) -> str:
    lines = [f"fine rankers by `sequence`, {split} day {eval_day}, seeds {summary['seeds']} (paired by seed)", "",
             "| variant | task | AUC (mean ± std) | AUC − none [95 % CI] | calibration | log-loss | truth AUC | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for variant, row in summary["variants"].items():
        for task in TASKS:
            r = row[task]
            d = r.get("vs_baseline", {}).get("auc")
            diff = f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else "—"
            lines.append(f"| {variant} | {task} | {r['auc']['mean']:.4f} ± {r['auc']['std']:.4f} | {diff} | "
                         f"{r['calibration']['mean']:.3f} | {r['logloss']['mean']:.4f} | {r['auc_truth']['mean']:.4f} | "
                         f"{r['train_seconds']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", choices=("valid", "test"), default="valid")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--variants", default=",".join(SEQUENCES))
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = a.variants.split(",")
    if "none" not in variants or any(v not in SEQUENCES for v in variants) or len(seeds) < 1:
        raise SystemExit(f"--variants must include none and be among {SEQUENCES}; --seeds at least one")
    root = Path(a.out) / a.split
    metrics = {v: {} for v in variants}
    for seed in seeds:  # seed-major: a stopped sweep has whole pairs
        for v in variants:
            metrics[v][seed] = run_one(a.data, root / v / f"seed{seed}", a.split, v, seed)
    summary = summarise(metrics)
    eval_day = next(iter(metrics["none"].values()))["eval_day"]
    report = format_report(summary, a.split, eval_day)
    (root / "results.json").write_text(json.dumps({"split": a.split, "eval_day": eval_day, **summary}, indent=2))
    (root / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
