"""Continuous operation: the service serves a day, trains on it, and serves the next with the new
models, day after day, against a frozen control arm (`recstack live`).

    result = live(LiveConfig(preset="small", days=7), "runs/live")

1. A world of `initial_days + days` days (simulated, or `data`); its first `initial_days` are the
   initial training window (`recstack.pipeline.live_data.window_world`), trained with the
   quickstart's recipe and exported once into two artifacts roots: arm A (frozen) and arm B
   (retrained). Each arm is its own server (a `recstack serve` process, or in process for the
   tests) with its own feature store and impression log, so each arm's users see only what
   their arm served them: the users are split by a hash of their id
   (`recstack.pipeline.replay.user_arm`).
2. Each live day d: both arms replay day d at once (`recstack.pipeline.replay`: the truth draws
   the clicks and purchases, which flow back through LogEvents with the users' own browsing of
   the day, as a client app sends it); arm B's logged rows of that day
   become a world folder (`live_data.day_log_world`); the models that served B on day d, and the
   frozen day-0 models, are scored on it (next-day AUC: rows neither has trained on); every stage
   is warm-started on it with one pass (`recstack.pipeline.warm.warm_stage`), exported as
   version `dayNN` into B's root and `Reload`ed while a probe sends Rank calls to B without a
   pause (`reload_under_traffic`: any failed call is counted).
3. Every day's outputs go to `days/dNN/` and `day.json` is written last, atomically; a restarted
   loop skips the days with a `day.json` and resumes the first other one at its first
   unfinished step (replay, training of each stage, export), then starts both servers on the
   roots' `current` bundles, whose stores and logs persist.
"""
from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recstack.pipeline import live_data, warm
from recstack.pipeline.live_report import concentration, day_line, summarise
from recstack.pipeline.quickstart import STAGE_ORDER, _free_port, _wait_serving
from recstack.pipeline.replay import ReplayConfig, replay

ARMS = ("A", "B")  # A: the frozen day-0 bundle; B: retrained every day
PROBE_PREFIX = "reload-probe-"  # request ids of the calls sent while B reloads (not training data)


@dataclass
class LiveConfig:
    preset: str = "small"  # world size when simulating
    days: int = 7  # live days served, trained on and reloaded
    initial_days: int = 4  # days of the initial training window (train 1..N-1, test N)
    seed: int = 0  # the world's seed
    sessions: int = 300  # replayed sessions per arm per day (a seeded sample of the arm's users' sessions)
    k: int = 10  # items per Rank call
    day_wall_s: float = 15.0  # a simulated day is compressed to about this many seconds of replay
    probe_s: float = 0.5  # Rank traffic to B before and after its Reload
    log_roll_s: float = 0.5  # the servers finish a log file at least this often (training reads finished files)
    train_overrides: dict = field(default_factory=dict)  # {stage: ["key=value", ...]} for the initial training
    # > 0: day 0's coarse stage is trained again on the fine order of day 0's first bundle (the
    # quickstart's --fine-distill pass) with this weight; warm days then keep distilling from the
    # bundle that served each day (recstack.pipeline.warm). 0: off
    fine_distill: float = 0.0
    browsing: bool = True  # the replay also sends the users' own browsing of the day (ReplayConfig.browsing)
    # the servers run on a virtual clock the replay sets to the simulated time (recstack.serving.clock),
    # so the features age behaviour as the world does; False: the wall clock (a replayed day lasts
    # seconds, and every replayed event counts as within the last hour)
    virtual_clock: bool = True
    in_process: bool = False  # servers in this process (tests) instead of `recstack serve` subprocesses

    def __post_init__(self) -> None:
        if self.days < 1 or self.initial_days < 3:
            raise ValueError("LiveConfig: days must be >= 1 and initial_days >= 3 (train, validation, test)")
        if self.sessions < 1 or self.k < 1 or not self.day_wall_s > 0:
            raise ValueError("LiveConfig: sessions and k must be >= 1, day_wall_s > 0")
        if not self.fine_distill >= 0:
            raise ValueError(f"LiveConfig: fine_distill must be >= 0 (0: off), got {self.fine_distill}")


# ------------------------------------------------------------------------------ servers


class SubprocessServer:
    """`recstack serve` on one artifacts root, with its store and impression log there."""

    def __init__(self, root: Path, token_file: Path, roll_s: float, clock_file: Path | None = None):
        self.root, self.token_file, self.roll_s, self.clock_file, self.proc = root, token_file, roll_s, clock_file, None

    def start(self) -> str:
        port = _free_port()
        log = open(self.root / "server.log", "ab")
        clock = ["--clock-file", str(self.clock_file)] if self.clock_file else []
        self.proc = subprocess.Popen([sys.executable, "-m", "recstack.cli", "serve", "--artifacts", str(self.root),
                                      "--port", str(port), "--admin-token-file", str(self.token_file),
                                      "--log-roll-s", str(self.roll_s), *clock], stdout=log, stderr=log)
        target = f"127.0.0.1:{port}"
        _wait_serving(target, self.proc)
        return target

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class InProcessServer:
    """The same server in this process (build_server on port 0, read back), for the tests."""

    def __init__(self, root: Path, token_file: Path, roll_s: float, clock_file: Path | None = None):
        self.root, self.token, self.roll_s = root, token_file.read_text().strip(), roll_s
        self.clock_file, self.server, self.servicer = clock_file, None, None

    def start(self) -> str:
        from recstack.serving.clock import FileClock
        from recstack.serving.events import LivePath
        from recstack.serving.server import build_server
        from recstack.serving.store import open_store

        live = LivePath(open_store("", self.root), self.root / "live_log", roll_s=self.roll_s)
        options = {"clock": FileClock(self.clock_file)} if self.clock_file else {}
        self.server, port, self.servicer = build_server(self.root, max_workers=4, admin_token=self.token, live=live,
                                                        cascade_options=options)
        return f"127.0.0.1:{port}"

    def stop(self) -> int:
        self.server.stop(5).wait()
        self.servicer.live.close()
        return 0


# ------------------------------------------------------------------------------ steps


def _write_json(path: Path, obj) -> None:
    """Atomically: a reader (or a resumed loop) sees the whole file or none."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def initial_bundle(cfg: LiveConfig, out: Path, data: str | None) -> tuple[Path, Path]:
    """Simulate (or take) the world, cut the window, train and export day 0 into both arms'
    roots (each step skipped when its output exists) -> (world, runs of day 0)."""
    from recstack.config import apply_overrides
    from recstack.pipeline.export import export_bundle
    from recstack.world import preset as world_preset
    from recstack.world import simulate

    world, window, runs = Path(data) if data else out / "world", out / "window", out / "runs" / "day00"
    need = cfg.initial_days + cfg.days
    if not (world / "world.json").exists():
        wcfg = world_preset(cfg.preset)
        wcfg.n_days = need
        simulate(wcfg, cfg.seed, world, preset=cfg.preset, progress=False)
    n_days = json.loads((world / "world.json").read_text())["n_days"]
    if n_days < need:
        raise ValueError(f"data: {world} has {n_days} days; {cfg.initial_days} initial + {cfg.days} live need {need}")
    if not (window / "world.json").exists():  # on the virtual clock the window ends now
        live_data.window_world(world, window, cfg.initial_days, end_epoch=time.time() if cfg.virtual_clock else None)
    for stage, pkg in STAGE_ORDER:
        if not (runs / stage / "checkpoint.pt").exists():
            mod = importlib.import_module(f"{pkg}.train")
            mod.train(apply_overrides(mod.Config(), cfg.train_overrides.get(stage, ())), window, runs / stage,
                      progress=False)
    if cfg.fine_distill > 0:
        distil_day0(cfg.fine_distill, window, runs, out)
    from recstack import bundle as B

    root_a, root_b = out / "arms" / "A", out / "arms" / "B"
    if not (root_a / B.CURRENT).exists():
        export_bundle(runs, root_a, version="day00")
    if not (root_b / B.CURRENT).exists():  # the same bundle, copied: B's root gets its own store and log
        shutil.copytree(root_a / "day00", root_b / "day00", dirs_exist_ok=True)
        B.write_current(root_b, "day00")
    return world, runs


def distil_day0(mu: float, window: Path, runs: Path, out: Path) -> None:
    """Day 0's coarse stage trained again on the fine order of a first bundle exported from the
    day-0 checkpoints (`out/day00_first`, removed when done); skipped when `runs/coarse` is
    already a distilled student."""
    from coarse_rank.config import checkpoint_config
    from recstack import bundle as B
    from recstack.pipeline.export import export_bundle
    from recstack.pipeline.quickstart import retrain_coarse_distilled

    ck = warm.C.load(runs / "coarse" / "checkpoint.pt", stage="coarse")
    if checkpoint_config(ck["config"]).fine_distill > 0:
        return
    first = out / "day00_first"
    if not (first / B.CURRENT).exists():
        export_bundle(runs, first, version="plain")
    retrain_coarse_distilled(window, runs, first, out / "day00_fine_distill", mu, progress=False)
    shutil.rmtree(first)


def replay_arms(targets: dict[str, str], world: Path, day: int, cfg: LiveConfig, prefix: str,
                clocks: dict[str, Path] | None = None, offset: float = 0.0) -> dict[str, dict]:
    """Both arms replay `day` at once (threads), each its own users -> {arm: replay report};
    `clocks`: each arm's clock file, set to `offset` + the simulated time."""
    n_sessions = max(1, cfg.sessions)
    speedup = 86400.0 / cfg.day_wall_s
    reports: dict[str, dict] = {}

    def run(i: int, arm: str) -> None:
        rc = ReplayConfig(day=day, sessions=n_sessions, speedup=speedup, max_wait_s=1.0, k=cfg.k, seed=cfg.seed * 1000 + day,
                          arm=i, arms=len(ARMS), browsing=cfg.browsing, request_prefix=prefix,
                          clock_file=str(clocks[arm]) if clocks else "", clock_offset=offset)
        reports[arm] = replay(targets[arm], str(world), rc)

    threads = [threading.Thread(target=run, args=(i, arm)) for i, arm in enumerate(ARMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [arm for arm in ARMS if arm not in reports]
    if missing:
        raise RuntimeError(f"replay of day {day}: arm(s) {missing} did not finish (see the error above)")
    return reports


def wait_logged(log_dir: Path, prefix: str, since: float, rows: int, timeout_s: float = 60.0) -> int:
    """Wait until the finished impression log holds the `rows` rows the day's replay was served
    -> rows; a log that lost or duplicated rows is an error (training would not see the day)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = len(live_data.day_rows(log_dir, prefix, since).get("item_id", ()))
        if found == rows:
            return found
        if found > rows or time.monotonic() > deadline:
            raise RuntimeError(f"impression log {log_dir}: {found} finished rows of {prefix}*, the replay was served "
                               f"{rows} (after {timeout_s:.0f}s)")
        time.sleep(0.2)


def reload_under_traffic(target: str, token: str, user_ids: list[int], probe_s: float, k: int) -> dict:
    """`Reload` B (it follows `current`) while a probe sends Rank calls back to back, from
    `probe_s` before it until `probe_s` after -> calls, failures, versions seen, seconds."""
    import grpc

    from recstack.serving import client
    from recstack.v1 import ranking_pb2_grpc as pb_grpc

    stop, seen, failed, calls = threading.Event(), {}, {}, [0]

    def probe() -> None:
        with client.channel(target) as ch:
            rank = pb_grpc.RankingServiceStub(ch).Rank
            while not stop.is_set():
                user = user_ids[calls[0] % len(user_ids)]
                try:
                    resp = rank(client.make_request(user, k), timeout=10.0,
                                metadata=(("x-request-id", f"{PROBE_PREFIX}{calls[0]}"),))
                    seen[resp.model_version] = seen.get(resp.model_version, 0) + 1
                except grpc.RpcError as e:
                    failed[e.code().name] = failed.get(e.code().name, 0) + 1
                calls[0] += 1

    t = threading.Thread(target=probe)
    t.start()
    time.sleep(probe_s)
    t0 = time.perf_counter()
    info = client.reload(target, admin_token=token)
    reload_s = time.perf_counter() - t0
    time.sleep(probe_s)
    stop.set()
    t.join()
    return {"version": info.model_version, "reload_s": reload_s,
            "probe_calls": calls[0], "probe_failed": failed, "versions_served": seen}


def _checkpoints(runs: Path) -> dict[str, Path]:
    return {stage: runs / stage / "checkpoint.pt" for stage, _ in STAGE_ORDER}


def score_models(world: Path, runs: dict[str, Path]) -> dict:
    """Each stage's AUC on the day's logged rows, for the served (`runs["served"]`) and the
    frozen day-0 (`runs["frozen"]`) models."""
    return {name: {stage: warm.score_stage(stage, path, world) for stage, path in _checkpoints(r).items()}
            for name, r in runs.items()}


def run_day(i: int, day: int, cfg: LiveConfig, out: Path, world: Path, targets: dict[str, str], token: str,
            prev_runs: Path, frozen_runs: Path, clocks: dict[str, Path] | None = None, offset: float = 0.0) -> dict:
    """Live day `i` (world day `day`): replay, score, warm-start, export, reload -> day.json's content."""
    from recstack import bundle as B
    from recstack.pipeline.export import export_bundle

    d_dir = out / "days" / f"d{i:02d}"
    d_dir.mkdir(parents=True, exist_ok=True)
    root_b = out / "arms" / "B"
    t0, timings = time.perf_counter(), {}
    if not (d_dir / "replay.json").exists():
        # on the virtual clock a repeated attempt of the day has the same times: its own prefix
        prefix = f"replay-d{day}-a{time.time_ns()}-" if clocks else f"replay-d{day}-"
        served = B.resolve_bundle(root_b).name
        reports = replay_arms(targets, world, day, cfg, prefix, clocks, offset)
        since = min(r["since"] for r in reports.values())
        _write_json(d_dir / "replay.json", {"since": since, "prefix": prefix, "served_b": served, "arms": reports})
    rep = json.loads((d_dir / "replay.json").read_text())
    prefix = rep.get("prefix", f"replay-d{day}-")
    timings["replay"] = time.perf_counter() - t0
    logged = wait_logged(root_b / "live_log", prefix, rep["since"], rep["arms"]["B"]["impressions"])
    t = time.perf_counter()
    built = live_data.day_log_world(root_b / "live_log", root_b / rep["served_b"], prefix, rep["since"], d_dir / "world")
    aucs = score_models(d_dir / "world", {"served": prev_runs, "frozen": frozen_runs})
    timings["log_and_score"] = time.perf_counter() - t
    t = time.perf_counter()
    trained = {}
    for stage, path in _checkpoints(prev_runs).items():
        done = d_dir / "runs" / stage / "checkpoint.pt"
        if done.exists():  # trained before an interruption
            trained[stage] = json.loads(json.dumps(warm.C.load(done)["metrics"], default=float))
        else:
            trained[stage] = warm.warm_stage(stage, path, d_dir / "world", d_dir / "runs" / stage, world_origin(prev_runs),
                                             served=root_b / rep["served_b"])
    timings["train"] = time.perf_counter() - t
    t = time.perf_counter()
    version = f"day{i:02d}"
    if not (root_b / version).is_dir():
        export_bundle(d_dir / "runs", root_b, version=version)
    else:  # exported before an interruption: make it current again
        B.write_current(root_b, version)
    timings["export"] = time.perf_counter() - t
    users = [int(u) for u in sorted(set(live_data.day_rows(root_b / "live_log", prefix, rep["since"])["user_id"].tolist()))]
    reload = reload_under_traffic(targets["B"], token, users or [0], cfg.probe_s, cfg.k)
    if reload["version"] != version:
        raise RuntimeError(f"Reload of B: serving {reload['version']!r}, expected {version!r}")
    timings["total"] = time.perf_counter() - t0
    return {"live_day": i, "world_day": day, "arms": rep["arms"], "served_b": rep["served_b"], "logged_rows": logged,
            "world_rows": built["world"]["days"], "history_events": built["events"], "auc": aucs,
            "trained": trained, "version": version, "reload": reload, "timings_s": timings}


def start_clocks(out: Path, cfg: LiveConfig) -> tuple[dict[str, Path], float]:
    """Each arm's clock file and the offset from the world's simulated seconds to its times: the
    day-0 bundle's snapshot time is the end of the initial window (every bundle exported from
    the window anchors its history there: `window_world`'s end_epoch). A new clock file starts
    there; a resumed loop keeps each arm's (the time of its last replayed call)."""
    from recstack import bundle as B
    from recstack.serving.clock import set_clock
    from recstack.serving.loading import snapshot_time

    manifest = json.loads((out / "arms" / "A" / "day00" / B.MANIFEST).read_text())
    window_end = float(json.loads((out / "window" / "world.json").read_text())["now"])
    offset = snapshot_time(manifest) - window_end
    clocks = {arm: out / "arms" / arm / "clock" for arm in ARMS}
    for path in clocks.values():
        if not path.exists():
            set_clock(path, offset + window_end)
    return clocks, offset


def world_origin(runs: Path) -> str:
    """The data folder the day-0 checkpoints name (export snapshots it: the pre-live history)."""
    return warm.C.load(runs / "retrieval" / "checkpoint.pt")["data_dir"]


def live(cfg: LiveConfig, out: str | Path, data: str | None = None, stop_after: int | None = None) -> dict:
    """Run (or resume) the loop -> the summary written to `out/results.json`. `stop_after`:
    return after that many live days of this call (an interruption, for the tests)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world, frozen = initial_bundle(cfg, out, data)
    token_file = out / "admin_token"
    if not token_file.exists():
        token_file.write_text(secrets.token_hex(16))
        token_file.chmod(0o600)
    token = token_file.read_text().strip()
    kind = InProcessServer if cfg.in_process else SubprocessServer
    clocks, offset = start_clocks(out, cfg) if cfg.virtual_clock else (None, 0.0)
    servers = {arm: kind(out / "arms" / arm, token_file, cfg.log_roll_s, clocks[arm] if clocks else None)
               for arm in ARMS}
    days, ran = [], 0
    targets = {}
    try:
        for arm, server in servers.items():
            targets[arm] = server.start()
        prev = frozen
        for i in range(1, cfg.days + 1):
            d_dir = out / "days" / f"d{i:02d}"
            if (d_dir / "day.json").exists():
                days.append(json.loads((d_dir / "day.json").read_text()))
                print(day_line(days[-1], resumed=True), flush=True)
            elif stop_after is not None and ran >= stop_after:
                break
            else:
                rec = run_day(i, cfg.initial_days + i, cfg, out, world, targets, token, prev, frozen, clocks, offset)
                _write_json(d_dir / "day.json", rec)
                days.append(rec)
                ran += 1
                print(day_line(rec), flush=True)
            prev = d_dir / "runs"
    finally:
        codes = {arm: s.stop() for arm, s in servers.items() if targets.get(arm)}
    for rec in days:  # what each arm showed, from the logs (the servers have flushed them)
        rep = json.loads((out / "days" / f"d{rec['live_day']:02d}" / "replay.json").read_text())
        prefix = rep.get("prefix", f"replay-d{rec['world_day']}-")
        rec["served_mix"] = {arm: concentration(out / "arms" / arm / "live_log", prefix, rep["since"]) for arm in ARMS}
    summary = summarise(days, {"config": asdict(cfg), "world": str(world), "days_run_now": ran,
                               "wall_s": time.perf_counter() - t0, "server_exit_codes": codes})
    _write_json(out / "results.json", summary)
    return summary


# ------------------------------------------------------------------------------ the command


def main_from_args(args) -> int:
    """`recstack live` (its arguments are in recstack.cli): run or resume, plot, print the totals."""
    from recstack.pipeline.live_report import plot

    given = {"days": args.days, "initial_days": args.initial_days, "sessions": args.sessions,
             "day_wall_s": args.day_wall_s, "fine_distill": args.fine_distill}
    cfg = LiveConfig(preset=args.preset, seed=args.seed, browsing=not args.no_browsing, virtual_clock=not args.wall_clock,
                     **{k: v for k, v in given.items() if v is not None})
    summary = live(cfg, args.out, data=args.data)
    png = plot(summary, Path(args.out) / "live.png")
    over = summary["over_days_b_minus_a"].get("expected_gmv")
    if over:
        print(f"B - A expected GMV per request over {over['n']} days: {over['mean']:+.4f} "
              f"[{over['ci95'][0]:+.4f}, {over['ci95'][1]:+.4f}] (paired by day)")
    print(f"{summary['failed_calls_total']} failed calls; {summary['wall_s']:.0f}s; "
          f"{Path(args.out) / 'results.json'}, {png}")
    return 0 if summary["failed_calls_total"] == 0 else 1
