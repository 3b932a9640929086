"""The parts of a coarse-ranker report every table shares: the header (world, windows, LR
sweep, cost) and the main results table, whose extra columns each experiment names."""
from __future__ import annotations

from typing import Callable, Sequence

from recstack.evaluation import report as R

Column = tuple[str, Callable[[str, dict], str]]  # (header, cell of (method name, its results))
HEADER = ["method", "student AUC (mean ± std)", "teacher AUC", "Δ vs baseline [95% CI]", "wall s", "CPU s", "LR"]


def lr_text(plan: dict) -> str:
    given = plan.get("selected_lrs") or {}
    n = plan.get("select_seeds", 1)
    if len(plan["lrs"]) == 1:
        return f"LR fixed at {plan['lrs'][0]:g} (no sweep: one candidate)"
    text = f"LR sweep {list(plan['lrs'])} chosen by the mean validation AUC over the first {n} seed(s)"
    if given:  # rates chosen by an earlier sweep (in the report that ran it) are not re-swept here
        text += f", except the rates given by `selected_lrs` {given}, chosen earlier on the same validation window"
    return text


def head(name: str, res: dict) -> list[str]:
    """The report's title and the paragraph on the world, the windows and the cost."""
    w = res["windows"]
    world = res.get("world") or {}
    test = ("not touched: this run only sweeps the LR" if res.get("select_only") else "touched once per run")
    ceiling = ([f"Ground-truth ceiling AUC on the test day (true pCTR vs clicks): {res['ceiling_auc']['mean']:.4f}.", ""]
               if "ceiling_auc" in res else [])
    return [
        f"# Coarse ranker — experiment `{name}` on the `{res['preset']}` world"
        + (" (QUICK smoke run: not a result)" if res["quick"] else "")
        + (" — PARTIAL: fewer paired seeds than the protocol's contrasts need" if _partial(res) else "")
        + (" — LR selection only" if res.get("select_only") else ""),
        "",
        f"World: `{res['preset']}` preset, {res['data_dir']} "
        f"(n_days={world.get('n_days')}, privileged_strength={world.get('privileged_strength')}). "
        f"Seeds {res['seeds']}. {lr_text(res['plan'])}: fit days {w['fit']} → "
        f"validation day {w['valid']}; test: train days {w['train']} → test day {w['test']} ({test}). "
        f"Total {res['total_seconds'] / 60:.1f} min wall ({res.get('workers', 1)} worker process(es), one thread each, "
        f"on a machine shared with other jobs: compare costs by CPU seconds, not wall seconds; fits found in "
        f"the --cache were reused, not re-run, and are not in this total).",
        "",
    ] + ceiling + _training(res.get("config") or {})


def _training(cfg: dict) -> list[str]:
    """The optimiser and LR schedule every fit of the table shares (the LRs are above)."""
    if not cfg:
        return []
    schedule = {"constant": "then constant (the paper's schedule)",
                "linear": "then falling linearly to 0 at the last step"}.get(cfg.get("lr_schedule", "constant"),
                                                                              cfg.get("lr_schedule"))
    return [f"Training: {cfg.get('optimizer')}, batch {cfg.get('batch_size')}, {cfg.get('epochs')} epoch(s), "
            f"the LR rising over {cfg.get('warmup_steps')} warm-up steps, {schedule}; manner "
            f"{cfg.get('manner')}, λ {cfg.get('lam')}.", ""]


def _partial(res: dict) -> bool:
    return any(not c.get("enough_seeds", True) for c in (res.get("contrasts") or {}).values())


def method_rows(methods: dict, extra: Sequence[Column] = ()) -> list[list[str]]:
    """One row per method: student and teacher AUC, Δ, cost, LR, then the `extra` columns."""
    rows = []
    for name, m in methods.items():
        d = m["delta_vs_baseline"]
        row = [name, R.fmt_mean_std(m["student_auc"]), R.fmt_mean_std(m["teacher_auc"], missing="—"),
               R.fmt_ci(d) if d and name != "baseline" else "—", f"{m['wall_s']:.1f}",
               f"{m.get('cpu_s', float('nan')):.1f}", f"{m.get('lr', float('nan')):g}"]
        row += [cell(name, m) for _, cell in extra]
        rows.append(row)
    return rows


def results_section(methods: dict, extra: Sequence[Column] = ()) -> list[str]:
    return ["## Results", "", R.markdown_table(HEADER + [h for h, _ in extra], method_rows(methods, extra)), ""]


def write(name: str, res: dict, body: list[str]) -> str:
    """The whole report.md text."""
    return "\n".join(head(name, res) + body + ["<!-- discussion -->", ""])
