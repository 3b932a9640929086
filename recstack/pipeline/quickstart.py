"""The embedded default, end to end on one machine:
simulate `small` -> train retrieval, coarse, fine -> export a bundle -> serve it on a free
local port (a real `recstack serve` process) -> rank a few users -> shut the server down.

With `fine_distill` > 0 a second coarse training sits between the export and the serving: the
first bundle's fine ranker orders each training day's retrieved candidates (the targets file,
recstack.pipeline.fine_targets), the coarse student is trained again to keep that order through
its cut (coarse_rank `fine_distill`), and the bundle is exported again with it.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STAGE_ORDER = (("retrieval", "retrieval"), ("coarse", "coarse_rank"), ("fine", "fine_rank"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(target: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode} before serving")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the server at {target} did not report SERVING within {timeout:.0f}s")


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _quality_lines(metrics: dict) -> list[str]:
    """Held-out quality of each stage next to what the truth (or popularity) achieves."""
    r, c, f = metrics.get("retrieval", {}), metrics.get("coarse", {}), metrics.get("fine", {})
    lines = ["held-out test day        model    reference"]
    for k in (50, 100, 500):
        if f"recall@{k}" in r:
            lines.append(f"retrieval recall@{k:<6d} {r[f'recall@{k}']:.4f}   {r[f'pop_recall@{k}']:.4f} (popularity)")
    if "auc" in c:
        lines.append(f"coarse AUC (click)       {c['auc']:.4f}   {c['ceiling_auc']:.4f} (true pCTR)")
        if c.get("objective", "ctr") != "ctr":
            lines[-1] += f"; ranks by {c['objective']}"
    for head, label in (("ctr", "click"), ("cvr", "purchase")):
        if head in f:
            m = f[head]
            lines.append(f"{'fine ' + head.upper() + ' AUC (' + label + ')':24s} {m['auc']:.4f}   {m['auc_truth']:.4f} (true p{head.upper()}); "
                         f"calibration {m['calibration']:.3f}")
    for key, note in (("cascade_before_fine_distill", " (coarse before fine_distill)"), ("cascade", "")):
        g = metrics.get(key, {})
        if "gmv_share" in g:
            lines.append(f"cascade GMV@{g['k']} share       {g['gmv_share']:.4f}   1 (the oracle's top {g['k']}); "
                         f"{g['n_users']} users, sizes {g['retrieval_size']} -> {g['coarse_size']} -> {g['k']}, "
                         f"oracle kept by coarse {g['recall_coarse']:.3f} of {g['recall_retrieval']:.3f} retrieved{note}")
    return lines


def cascade_share(bundle: str | Path, data_dir: str | Path, out_dir: str | Path, n_users: int = 150) -> dict:
    """The served cascade's GMV@50 share on the test day at the serving defaults (stage sizes and
    i2i share), for a sample of `n_users` users (recstack.evaluation.cascade, no exhaustive
    reference, no plot). About 8 s of CPU on `small` with 150 users."""
    from recstack.evaluation import cascade as cascade_eval
    from recstack.serving.cascade import Cascade

    cascade = Cascade.load(bundle)
    s = cascade_eval.Settings(n_users=n_users, retrieval_sizes=(cascade_eval.Settings.default_retrieval,),
                              coarse_sizes=(cascade_eval.Settings.default_coarse,), i2i_shares=(cascade.i2i_share,),
                              exhaustive=False, plot=False)
    row = cascade_eval.run(bundle, data_dir, out_dir, s, cascade=cascade)
    res = row["configs"][0]  # the one grid point: the default sizes
    return {"k": row["k"], "n_users": row["n_users"], **{k: res[k] for k in (
        "retrieval_size", "coarse_size", "gmv_share", "gmv_share_se", "recall_retrieval", "recall_coarse", "recall_served")}}


def distil_coarse(data_dir: str | Path, runs_dir: str | Path, art_dir: str | Path, work: str | Path, mu: float,
                  coarse_settings: dict | None = None, max_requests: int = 0, progress: bool = True) -> tuple[Path, dict]:
    """Train the coarse stage again, distilling the current bundle's fine order into its cut
    (`retrain_coarse_distilled`), and export the bundle again -> (the new bundle, what was done)."""
    from recstack.pipeline.export import export_bundle

    info = retrain_coarse_distilled(data_dir, runs_dir, art_dir, work, mu, coarse_settings, max_requests, progress)
    return export_bundle(runs_dir, art_dir), info


def retrain_coarse_distilled(data_dir: str | Path, runs_dir: str | Path, art_dir: str | Path, work: str | Path,
                             mu: float, coarse_settings: dict | None = None, max_requests: int = 0,
                             progress: bool = True) -> dict:
    """Train the coarse stage again with the pairs of the bundle's fine order -> what was done.

    The coarse stage is trained with the config of the checkpoint trained without the pairs
    (`runs_dir/coarse_plain` once this has run, else `runs_dir/coarse`), plus `fine_distill=mu`
    and the targets file `work/fine_targets.npz` (the coarse split's training days, ranked by the
    bundle `art_dir` serves). It trains into a folder of its own and replaces `runs_dir/coarse`
    only when done; the checkpoint without the pairs is kept as `runs_dir/coarse_plain`.
    `coarse_settings`: coarse_rank Config fields to change besides (tests shrink the model);
    `max_requests` > 0 samples that many requests per day for the targets."""
    from dataclasses import replace

    from coarse_rank.config import checkpoint_config
    from coarse_rank.train import train as train_coarse
    from recstack.pipeline import fine_targets
    from recstack.training import checkpoint

    if mu <= 0:
        raise ValueError(f"fine_distill must be > 0 to distil, got {mu}")
    runs_dir, work = Path(runs_dir), Path(work)
    current, plain, fresh = runs_dir / "coarse", runs_dir / "coarse_plain", runs_dir / "coarse_distilled"
    base = plain if plain.exists() else current
    cfg = checkpoint_config(checkpoint.load(base / "checkpoint.pt", stage="coarse")["config"])
    cfg = replace(cfg, **(coarse_settings or {}))
    targets = work / "fine_targets.npz"
    t = time.perf_counter()
    meta = fine_targets.build(data_dir, art_dir, targets, split=cfg.split, max_requests=max_requests, progress=progress)
    info = {"targets": str(targets), "requests": meta["requests"], "targets_s": round(time.perf_counter() - t, 1)}
    t = time.perf_counter()
    if fresh.exists():
        shutil.rmtree(fresh)
    info["coarse"] = train_coarse(replace(cfg, fine_distill=float(mu), fine_targets=str(targets)), data_dir, fresh,
                                  progress=progress)
    info["train_s"] = round(time.perf_counter() - t, 1)
    if not plain.exists():
        current.rename(plain)
    elif current.exists():  # an earlier distilled student
        shutil.rmtree(current)
    fresh.rename(current)  # the export reads runs_dir/coarse
    return info


def _serve_and_rank(art_dir: Path, n_users: int, timings: dict) -> int:
    """`recstack serve` the bundle on a free local port, rank a few users over gRPC (the last one
    unknown: a cold start), stop the server -> its exit code. Records timings["server_start"]."""
    from recstack.serving.client import format_table, rank

    port = _free_port()
    target = f"127.0.0.1:{port}"
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "recstack.cli", "serve", "--artifacts", str(art_dir), "--port", str(port)])
    try:
        _wait_serving(target, proc)
        timings["server_start"] = time.perf_counter() - t
        print(f"serving on {target} after {timings['server_start']:.1f}s")
        for user in (0, 1, n_users // 2, n_users + 12345):
            resp = rank(target, user, 10, debug=True, timeout=5.0)
            print(f"\nuser {user}{' (unknown: cold start)' if resp.cold_start else ''}")
            print(format_table(resp))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    print(f"\nserver stopped (exit code {code})")
    return code


def quickstart(workdir: str | Path = "runs/quickstart", preset: str = "small", seed: int = 0,
               fine_distill: float = 0.0) -> int:
    import importlib

    from recstack.world import preset as world_preset
    from recstack.world import simulate

    if fine_distill < 0:
        raise ValueError(f"--fine-distill must be >= 0 (0: off), got {fine_distill:g}")
    t0 = time.perf_counter()
    work = Path(workdir)
    data_dir, runs_dir, art_dir = work / "data", work / "runs", work / "artifacts"
    timings: dict[str, float] = {}

    _banner(f"1/5 simulate the `{preset}` world (seed {seed}) -> {data_dir}")
    t = time.perf_counter()
    meta = simulate(world_preset(preset), seed, data_dir, preset=preset)
    timings["simulate"] = time.perf_counter() - t
    n_imp = sum(d["impressions"] for d in meta["days"])
    print(f"{n_imp} impressions over {meta['n_days']} days, {meta['n_events']} behaviours, in {timings['simulate']:.1f}s")

    metrics = {}
    for i, (stage, pkg) in enumerate(STAGE_ORDER, start=2):
        _banner(f"{i}/5 train {stage}" if stage != "fine" else f"{i}/5 train fine (CTR + CVR)")
        mod = importlib.import_module(f"{pkg}.train")
        t = time.perf_counter()
        metrics[stage] = mod.train(mod.Config(), data_dir, runs_dir / stage)
        timings[f"train_{stage}"] = time.perf_counter() - t

    _banner(f"export the bundle -> {art_dir}")
    from recstack.pipeline.export import export_bundle

    t = time.perf_counter()
    bundle = export_bundle(runs_dir, art_dir)
    timings["export"] = time.perf_counter() - t
    print(f"bundle {bundle}")

    if fine_distill > 0:
        _banner(f"distil the fine ranker's order into the coarse cut (fine_distill={fine_distill:g})")
        t = time.perf_counter()
        metrics["cascade_before_fine_distill"] = cascade_share(bundle, data_dir, work / "cascade_before_fine_distill")
        bundle, info = distil_coarse(data_dir, runs_dir, art_dir, work, fine_distill)
        metrics["coarse_before_fine_distill"], metrics["coarse"] = metrics["coarse"], info.pop("coarse")
        metrics["fine_distill"] = {"mu": fine_distill, **info}
        timings["fine_distill"] = time.perf_counter() - t
        print(f"bundle {bundle} (the coarse student distilled from the fine order; the first one's checkpoint: "
              f"{runs_dir / 'coarse_plain'})")

    _banner("5/5 serve and rank")
    code = _serve_and_rank(art_dir, meta["vocab"]["n_users"], timings)

    _banner("cascade against the truth (GMV@50 share, 150 test-day users)")
    t = time.perf_counter()
    metrics["cascade"] = cascade_share(bundle, data_dir, work / "cascade")
    timings["cascade_eval"] = time.perf_counter() - t

    _banner("summary")
    total = time.perf_counter() - t0
    summary = {"preset": preset, "seed": seed, "wall_s": round(total, 1), "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "metrics": metrics, "bundle": str(bundle), "server_exit_code": code}
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    for line in _quality_lines(metrics):
        print(line)
    print(f"timings: {summary['timings_s']}")
    print(f"wrote {data_dir}/ (the world), {runs_dir}/ (checkpoints), {bundle}/ (the bundle), {work / 'summary.json'}")
    print(f"quickstart finished in {total:.0f}s; summary in {work / 'summary.json'}")
    return 0 if code == 0 else 1
