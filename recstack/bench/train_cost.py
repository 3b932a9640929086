"""Training cost of the coarse teachers: CPU seconds per optimiser step for each teacher
(Share&Sync unless told otherwise), relative to the student trained alone.

PFD Table 7's cost column, isolated from a full experiment: the same world, the same
windows and the same number of steps for every row, single-threaded, repeated in an
interleaved order (baseline, sd, ..., baseline, sd, ...) so that a change in the machine's
load hits every row alike. Ratios are taken within a repeat and then summarised; the
absolute seconds belong to this machine only.

    recstack bench train --data DATA_DIR --out OUT_DIR --steps 200 --repeats 3
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from coarse_rank.train import MANNERS, TEACHERS, Config, fit
from recstack.bench.timing import loadavg
from recstack.config import ConfigError
from recstack.data import SimData, load
from recstack.evaluation import report as X

ROWS = ("baseline", "sd", "lupi", "md", "pfd", "pfd_md")


def _row_config(row: str, manner: str, steps: int, seed: int) -> Config:
    return Config(teacher=row, manner=manner, max_steps=steps, eval_max_rows=1000, seed=seed, objective="ctr")  # the PFD rows


def measure(data: SimData, rows: Sequence[str] = ROWS, *, manner: str = "share_sync", steps: int = 200,
            repeats: int = 3, base_days: int = 2, seed: int = 1, log: Callable[[str], None] = print) -> dict:
    """-> {"rows": {row: {"cpu_s_per_step": [...], "wall_s_per_step": [...], "cpu_ratio": summary, ...}}, ...}.

    Every fit trains `steps` steps on the `base_days` days before the last one (the
    experiments' test window) and is scored on 1,000 rows of the last day (not timed).
    """
    bad = [r for r in rows if r not in TEACHERS]
    if bad or "baseline" not in rows:
        raise ConfigError(f"rows: need 'baseline' and known teachers, got unknown {bad}" if bad else
                          "rows: the baseline is the denominator of every ratio; include it")
    if manner not in MANNERS:
        raise ConfigError(f"manner must be one of {MANNERS}, got {manner!r}")
    if steps < 10 or repeats < 1:
        raise ConfigError("steps >= 10 and repeats >= 1 required")
    last = data.n_days
    days = list(range(max(1, last - base_days), last))
    torch.set_num_threads(1)
    # warm-up: the first fit in a process pays one-off costs (allocator, kernels, imports)
    fit(_row_config("baseline", manner, 10, seed), data, days, last, eval_teacher=False)
    cpu: dict[str, list[float]] = {r: [] for r in rows}
    wall: dict[str, list[float]] = {r: [] for r in rows}
    for rep in range(repeats):
        for r in rows:
            f = fit(_row_config(r, manner, steps, seed), data, days, last, eval_teacher=False)
            n = int(f.result.get("steps", steps)) or steps
            cpu[r].append(f.result["train_cpu_seconds"] / n)
            wall[r].append(f.result["train_seconds"] / n)
            log(f"  repeat {rep + 1}/{repeats} {r}: {1e3 * cpu[r][-1]:.1f} CPU ms/step, {1e3 * wall[r][-1]:.1f} wall ms/step")
    out = {}
    for r in rows:
        ratios = [c / b for c, b in zip(cpu[r], cpu["baseline"])]
        out[r] = {
            "cpu_s_per_step": cpu[r], "wall_s_per_step": wall[r],
            "cpu_ms_per_step_median": 1e3 * statistics.median(cpu[r]),
            "cpu_ratio_vs_baseline": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "wall_ratio_vs_baseline": statistics.median(w / b for w, b in zip(wall[r], wall["baseline"])),
        }
    return {"rows": out, "manner": manner, "steps": steps, "repeats": repeats, "fit_days": days,
            "batch_size": Config().batch_size, "threads": 1}


def write_report(out: Path, res: dict) -> Path:
    rows = res["rows"]
    names = list(rows)
    plt = X._plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(range(len(names)), [rows[n]["cpu_ratio_vs_baseline"]["median"] for n in names], color="tab:blue")
    ax.axhline(1.25, color="tab:red", ls="--", lw=1, label="target 1.25x")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("CPU time per step / baseline")
    ax.set_title(f"Coarse training cost ({res['manner']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "train_cost.png", dpi=120)
    plt.close(fig)
    table = X.markdown_table(
        ["row", "CPU ms / step (median)", "CPU ratio vs baseline (median [min, max] over repeats)", "wall ratio (median)"],
        [[n, f"{rows[n]['cpu_ms_per_step_median']:.1f}",
          f"{rows[n]['cpu_ratio_vs_baseline']['median']:.2f}x [{rows[n]['cpu_ratio_vs_baseline']['min']:.2f}, "
          f"{rows[n]['cpu_ratio_vs_baseline']['max']:.2f}]", f"{rows[n]['wall_ratio_vs_baseline']:.2f}x"] for n in names])
    text = "\n".join([
        f"# Coarse ranker — training cost per teacher ({res['manner']})", "",
        f"World `{res['world']}`; {res['steps']} optimiser steps of batch {res['batch_size']} on days {res['fit_days']}, "
        f"one thread, {res['repeats']} interleaved repeats; load average at the start {res['loadavg_start']} and at the "
        f"end {res['loadavg_end']} on {res['machine']}. Ratios are paired within a repeat.", "",
        table, "", "![cost](train_cost.png)", "",
        "The target: Share&Sync PFD ≤ 1.25× the baseline's wall time (the paper: +2.9 % to +22.5 %). "
        "CPU time is the sturdier reading on a shared machine; both are in `results.json`.", "",
        "```bash", res["command"], "```", ""])
    (out / "report.md").write_text(text)
    return out / "report.md"


def run(data_dir: str | Path, out_dir: str | Path, *, rows: Sequence[str] = ROWS, manner: str = "share_sync",
        steps: int = 200, repeats: int = 3, command: str = "") -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load(data_dir)
    load0 = loadavg()
    t0 = time.perf_counter()
    res = measure(data, rows, manner=manner, steps=steps, repeats=repeats)
    res.update(world=f"{data.world.get('preset')} (seed {data.world.get('seed')})", data_dir=str(Path(data_dir).resolve()),
               loadavg_start=load0, loadavg_end=loadavg(), machine=platform.processor() or
               platform.machine(), wall_s=time.perf_counter() - t0, command=command or "recstack bench train")
    (out / "results.json").write_text(json.dumps(res, indent=2))
    write_report(out, res)
    return res

