"""Train one retrieval model per setting and collect their metrics: the ablations and the
seeded contrasts of docs/results/retrieval/ (options are chosen on `--split valid`).

    python -m retrieval.sweep --data data/small --out runs/sweep --split valid \\
        --run "" --run "positives=log" --run "positives=log;logq_alpha=0.5" --seeds 0 1 2

Each `--run` is a `;`-separated list of `key=value` settings on top of the defaults ("" = the
defaults), trained once per seed into OUT/<run index>-s<seed>/; one JSON line per model is
appended to OUT/results.jsonl (its settings, seed, split and train()'s metrics). A model
whose line is already there is skipped, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from recstack.config import apply_overrides

from retrieval.config import SPLITS, Config
from retrieval.train import train


def settings(spec: str) -> list[str]:
    """'a=1;b=2' -> ['a=1', 'b=2'] ('' -> [])."""
    return [s.strip() for s in spec.split(";") if s.strip()]


def done(results: Path) -> set[tuple[str, int, str]]:
    if not results.exists():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["run"], int(r["seed"]), r["split"]) for r in rows}


def run(data: str, out: str | Path, runs: list[str], seeds: list[int], split: str, progress: bool = False) -> Path:
    """Train every (run, seed) not yet in OUT/results.jsonl; returns that file's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    for i, spec in enumerate(runs):
        cfg0 = apply_overrides(Config(split=split), settings(spec))  # a bad key fails before any training
        cfg0.validate()
        for seed in seeds:
            if (spec, seed, split) in done(results):
                continue
            cfg = apply_overrides(cfg0, [f"seed={seed}"])
            t0 = time.perf_counter()
            metrics = train(cfg, data, out / f"{i:02d}-s{seed}", progress=progress)
            row = {"run": spec, "seed": seed, "split": split, "wall_s": time.perf_counter() - t0, **metrics}
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return results


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--run", action="append", default=[], help="'key=value;key=value' ('' = the defaults); repeatable")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--split", choices=SPLITS, default="valid")
    a = p.parse_args(argv)
    return run(a.data, a.out, a.run or [""], a.seeds, a.split)


if __name__ == "__main__":
    main()
