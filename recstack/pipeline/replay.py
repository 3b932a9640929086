"""Replay a simulated day against a running server: an online test scored by the world's truth.

    report = replay("127.0.0.1:50051", "data/small", ReplayConfig(day=14, sessions=500))

The day's sessions (a seeded sample, in time order) are sent as `Rank` calls at their session
times compressed by `speedup` (simulated seconds per wall second; a gap is never slept longer
than `max_wait_s`). On what the server returned, clicks are drawn from the world's true pCTR
and purchases from its true pCVR (recstack.world.truth), and sent back through
`EventService.LogEvents` with the call's request id, timestamped with the wall clock, so the
next call of the same user sees them and the impression log can join them. The report gives,
per request, clicks, CTR, conversions and GMV (realised) and the expected GMV under the truth
(no sampling noise from the draws), each as a mean with a 95 % t interval over requests, and
the served heads' calibration against the truth on the items served (`calibration_vs_truth`).
`arm` / `arms` replay one arm of an A/B split by user (`user_arm`: a fixed hash of the id), so
two servers can each take their half of the same day.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import grpc
import numpy as np
from scipy import stats

from recstack.data import load
from recstack.features import EVENT_KINDS
from recstack.serving import client
from recstack.serving.clock import set_clock
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc
from recstack.world.truth import Truth


@dataclass(frozen=True)
class ReplayConfig:
    day: int = 0  # the simulated day to replay; 0 = the world's test day
    sessions: int = 200  # sessions replayed: a seeded sample of the day's, sent in time order
    speedup: float = 3600.0  # simulated seconds per wall-clock second
    max_wait_s: float = 2.0  # the longest pause between two sessions, whatever the compressed gap
    k: int = 10  # items asked for per call
    dwell_mean_s: float = 30.0  # a click's dwell is drawn from an exponential with this mean
    seed: int = 0
    timeout_s: float = 5.0  # each call's deadline
    # an A/B split by user: only the users with user_arm(user, arms) == arm are replayed
    arm: int = 0
    arms: int = 1
    # the users' own browsing of the day (the world log's views, favourites and add-to-carts,
    # which the recommender did not cause) goes through LogEvents as time passes, as a client
    # app would send it: the feature store and the impression log then hold what they hold in
    # production, not only the clicks on what was served
    browsing: bool = True
    # a virtual clock (recstack.serving.clock): when set, the server runs with --clock-file at
    # this path and the replay sets it to clock_offset + each session's simulated time before
    # the call, and stamps every event at clock_offset + its simulated time, so the server ages
    # behaviour as the simulated world would. "" = the wall clock (a compressed day: every
    # replayed event looks seconds old)
    clock_file: str = ""
    clock_offset: float = 0.0
    request_prefix: str = ""  # each call's request id is this + "s<session>"; "" = "replay-d<day>-"

    def __post_init__(self):
        if self.sessions < 1 or self.k < 1:
            raise ValueError("ReplayConfig: sessions and k must be >= 1")
        if not 0 <= self.arm < self.arms:
            raise ValueError(f"ReplayConfig: arm must be in [0, arms={self.arms}), got {self.arm}")
        if not (self.speedup > 0 and self.max_wait_s >= 0 and self.timeout_s > 0 and self.dwell_mean_s >= 0):
            raise ValueError("ReplayConfig: speedup and timeout_s must be > 0; max_wait_s, dwell_mean_s >= 0")


def mean_ci(x: np.ndarray, level: float = 0.95) -> dict:
    """Mean and its t interval over independent requests."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    m = float(x.mean()) if n else float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    sd = float(x.std(ddof=1)) if n > 1 else float("nan")
    return {"mean": m, "ci_low": m - half, "ci_high": m + half, "n": n, "sd": sd}


def user_arm(users: np.ndarray, arms: int) -> np.ndarray:
    """Each user's arm of an `arms`-way split: a fixed multiplicative hash of the id, so the
    split is the same on every day and in every process."""
    return ((np.asarray(users, np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)) % np.uint64(arms)


def _sessions(data, day: int, n: int, seed: int, arm: int = 0, arms: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(session ids, users, start times) of a seeded sample of the day's sessions (of the
    users of `arm`), in time order."""
    imps = data.impressions(day)
    sid, first = np.unique(imps["session_id"], return_index=True)
    mine = user_arm(imps["user_id"][first], arms) == arm
    sid, first = sid[mine], first[mine]
    pick = np.sort(np.random.default_rng(seed).permutation(len(sid))[:n])
    sid, user, ts = sid[pick], imps["user_id"][first][pick], imps["ts"][first][pick]
    order = np.argsort(ts, kind="stable")
    return sid[order], user[order].astype(np.int64), ts[order]


BROWSE_KINDS = ("view", "favourite", "cart")
BROWSE_BATCH = 500  # events per LogEvents call (well under the server's default message size)


def _browsing(data, day: int, arm: int, arms: int) -> dict[str, np.ndarray]:
    """The day's browsing events (BROWSE_KINDS) of the users of `arm`, in time order."""
    ev = data.events
    keep = (np.isin(ev["kind"], [EVENT_KINDS.index(k) for k in BROWSE_KINDS]) & (data.day_of(ev["ts"]) == day)
            & (user_arm(ev["user_id"], arms) == arm))
    order = np.argsort(ev["ts"][keep], kind="stable")
    return {k: ev[k][keep][order] for k in ("user_id", "ts", "item_id", "kind", "dwell")}


class _Time:
    """The times a replay stamps: the wall clock with the day compressed by `speedup`, or the
    virtual clock it sets for the server (ReplayConfig.clock_file)."""

    def __init__(self, cfg: ReplayConfig):
        self.file, self.offset, self.speedup = cfg.clock_file, cfg.clock_offset, cfg.speedup

    def at(self, t_sim: float) -> None:
        """Move the server's clock to simulated time `t_sim` (nothing on the wall clock)."""
        if self.file:
            set_clock(self.file, self.offset + t_sim)

    def stamp(self, t_sim: float, t_now: float) -> float:
        """The timestamp of an event at simulated `t_sim`, sent at simulated `t_now`."""
        return self.offset + t_sim if self.file else time.time() - (t_now - t_sim) / self.speedup

    def since(self, t_first: float) -> float:
        """A time at or before every row the replay will log."""
        return self.offset + t_first - 1.0 if self.file else time.time()


class _BrowseFeed:
    """Sends the browsing that happened up to a simulated time, each event stamped by `clock`."""

    def __init__(self, events: dict[str, np.ndarray], clock: _Time, log_events, timeout_s: float):
        self.ev, self.clock, self.log_events, self.timeout_s = events, clock, log_events, timeout_s
        self.next, self.sent, self.failed = 0, 0, {}

    def until(self, t_sim: float | None) -> None:
        """Send every event at or before `t_sim` (None: all that remain)."""
        ts = self.ev["ts"]
        end = len(ts) if t_sim is None else int(np.searchsorted(ts, t_sim, side="right"))
        t_ref = float(t_sim if t_sim is not None else (ts[end - 1] if end else 0.0))
        if t_sim is None and end > self.next:
            self.clock.at(t_ref)  # the day's last browsing: the server's clock moves to it first
        for lo in range(self.next, end, BROWSE_BATCH):
            hi = min(end, lo + BROWSE_BATCH)
            batch = [client.event(int(u), int(i), self.clock.stamp(float(t), t_ref), EVENT_KINDS[k], float(d))
                     for u, t, i, k, d in zip(self.ev["user_id"][lo:hi], ts[lo:hi], self.ev["item_id"][lo:hi],
                                              self.ev["kind"][lo:hi], self.ev["dwell"][lo:hi])]
            try:
                self.log_events(pb.LogEventsRequest(events=batch), timeout=self.timeout_s)
                self.sent += len(batch)
            except grpc.RpcError as e:
                key = f"LogEvents browsing {e.code().name}"
                self.failed[key] = self.failed.get(key, 0) + 1
        self.next = max(self.next, end)


def replay(target: str, data_dir: str, cfg: ReplayConfig = ReplayConfig(), keep_rows: bool = False) -> dict:
    """Run the replay against `target` -> the report (see the module docstring); `keep_rows`
    adds "rows": each answered session's id and values, for a paired comparison."""
    data = load(data_dir)
    truth = Truth.load(data_dir)
    day = cfg.day or data.test_day
    sid, users, ts = _sessions(data, day, cfg.sessions, cfg.seed, cfg.arm, cfg.arms)
    rng = np.random.default_rng(cfg.seed)
    rows: dict[str, list] = {k: [] for k in ("clicks", "ctr", "conversions", "gmv", "expected_gmv")}
    answered: list[int] = []
    failed, degraded, events_sent, served = {}, 0, 0, 0
    sums = np.zeros(4)  # over the served items: sum pCTR-hat, sum pCTR, sum pCTR * pCVR-hat, sum pCTR * pCVR
    clock = _Time(cfg)
    since = clock.since(float(ts[0]))
    with client.channel(target) as ch:
        rank, log_events = pb_grpc.RankingServiceStub(ch).Rank, pb_grpc.EventServiceStub(ch).LogEvents
        feed = _BrowseFeed(_browsing(data, day, cfg.arm, cfg.arms) if cfg.browsing else
                           {k: np.zeros(0) for k in ("user_id", "ts", "item_id", "kind", "dwell")},
                           clock, log_events, cfg.timeout_s)
        t_wall, t_sim = time.monotonic(), float(ts[0])
        for s, user, t in zip(sid.tolist(), users.tolist(), ts.tolist()):
            time.sleep(max(0.0, min(cfg.max_wait_s, (t - t_sim) / cfg.speedup - (time.monotonic() - t_wall))))
            t_wall, t_sim = time.monotonic(), t
            clock.at(t)  # before the browsing: the server checks each event against its clock
            feed.until(t)
            rid = f"{cfg.request_prefix or f'replay-d{day}-'}s{s}"
            try:
                resp = rank(client.make_request(user, cfg.k, debug=False), timeout=cfg.timeout_s,
                            metadata=(("x-request-id", rid),))
            except grpc.RpcError as e:
                failed[e.code().name] = failed.get(e.code().name, 0) + 1
                continue
            degraded += resp.degraded_features
            served += len(resp.items)
            items = np.array([it.item_id for it in resp.items], np.int64)[None]  # (1, K)
            price = np.array([it.price for it in resp.items])
            p, q = truth.pctr([user], items, day)[0], truth.pcvr([user], items, day)[0]
            pctr_hat = np.array([it.pctr for it in resp.items])
            pcvr_hat = np.array([it.pcvr for it in resp.items])
            sums += (pctr_hat.sum(), p.sum(), (p * pcvr_hat).sum(), (p * q).sum())
            click = rng.random(len(p)) < p
            buy = click & (rng.random(len(p)) < q)
            now = clock.stamp(t, t)
            events = [client.event(user, int(i), now, "click", float(rng.exponential(cfg.dwell_mean_s)), request_id=rid)
                      for i in items[0][click]]
            events += [client.event(user, int(i), now + 1e-3, "purchase", request_id=rid) for i in items[0][buy]]
            if events:
                try:
                    log_events(pb.LogEventsRequest(events=events), timeout=cfg.timeout_s)
                    events_sent += len(events)
                except grpc.RpcError as e:
                    failed[f"LogEvents {e.code().name}"] = failed.get(f"LogEvents {e.code().name}", 0) + 1
            answered.append(s)
            for key, value in (("clicks", click.sum()), ("ctr", click.mean()), ("conversions", buy.sum()),
                               ("gmv", float((price * buy).sum())), ("expected_gmv", float((p * q * price).sum()))):
                rows[key].append(float(value))
        feed.until(None)  # the rest of the day's browsing: tomorrow's features count it
    failed.update(feed.failed)
    report = {"target": target, "data": str(data_dir), "day": day, "config": asdict(cfg), "since": since,
              "requests": len(rows["clicks"]), "impressions": served, "failed": failed, "degraded": int(degraded),
              "events_sent": events_sent, "browse_events_sent": feed.sent, "per_request": {k: mean_ci(np.array(v)) for k, v in rows.items()},
              "calibration_vs_truth": calibration_vs_truth(*sums)}
    if keep_rows:
        report["rows"] = {"session": answered, **rows}
    return report


def calibration_vs_truth(pctr_hat: float, pctr: float, pcvr_hat_w: float, pcvr_w: float) -> dict:
    """The served heads' calibration against the world's true probabilities on the items served,
    free of the draws' noise: CTR = sum pCTR-hat / sum pCTR; CVR = sum pCTR * pCVR-hat / sum pCTR *
    pCVR (each served item weighted by its true chance of a click, as the CVR head is trained on
    clicks). 1.0 is calibrated; NaN where nothing was served."""
    def ratio(a: float, b: float) -> float:
        return float(a / b) if b > 0 else math.nan

    return {"ctr": ratio(pctr_hat, pctr), "cvr": ratio(pcvr_hat_w, pcvr_w)}


def format_report(r: dict) -> str:
    lines = [f"replay of day {r['day']} against {r['target']}: {r['requests']} requests, {r['events_sent']} events "
             f"sent, {r.get('browse_events_sent', 0)} browsing events sent, {r['degraded']} degraded, "
             f"failed {r['failed'] or 0}",
             f"{'per request':<14}{'mean':>12}{'95% CI':>26}"]
    for k, v in r["per_request"].items():
        lines.append(f"{k:<14}{v['mean']:>12.4f}   [{v['ci_low']:.4f}, {v['ci_high']:.4f}]")
    if "calibration_vs_truth" in r:
        c = r["calibration_vs_truth"]
        lines.append(f"served heads' calibration against the truth (mean prediction / true probability): "
                     f"CTR {c['ctr']:.3f}, CVR {c['cvr']:.3f}")
    return "\n".join(lines)
