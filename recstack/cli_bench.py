"""`recstack bench {all,retrieval,cascade,models,train,soak,backends,mixed}`: one sub-parser per benchmark, so that
`recstack bench X --help` shows only X's options. Reports go to `--out`, by default a fresh
`./runs/bench-<what>-<timestamp>/` (never into a checkout's committed `docs/results/`)."""
from __future__ import annotations

import argparse
import errno
import json
import shutil
import sys
import textwrap
import time
from pathlib import Path


TEACHER_CHAIN = """\
The PFD+MD teacher is an input, trained first (a benchmark trains nothing). The coarse
checkpoint.pt holds the student only; the training state beside it holds the teacher too:

  recstack train coarse --data DATA_DIR --out TEACHER_RUNS --set teacher=pfd_md \\
      --set max_steps=600 --set eval_max_rows=20000 --checkpoint-every 600
  recstack bench all --artifacts ARTIFACTS --data DATA_DIR --teacher TEACHER_RUNS/coarse
"""


def fresh_dir(what: str, root: str | Path = "runs") -> Path:
    """`root/bench-<what>-<YYYYmmdd-HHMMSS>`, suffixed -2, -3, ... if that name is taken."""
    base = Path(root) / f"bench-{what}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def written_since(folder: Path, since: float) -> list[Path]:
    """Files under `folder` modified at or after `since` (time.time()), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_mtime >= since - 1.0)


def print_written(folder: Path, since: float) -> None:
    files = written_since(folder, since)
    print(f"wrote {folder}/: " + (", ".join(str(p.relative_to(folder)) for p in files) if files else "(nothing)"))


def _command() -> str:
    return "recstack " + " ".join(sys.argv[1:])


def _all(args, out: Path) -> None:
    from recstack.bench.suite import Sizes, run_all

    res = run_all(out, data_dir=args.data, artifacts=args.artifacts, teacher=args.teacher,
                  scratch=args.scratch or "/tmp/recstack-bench", runs=args.runs, sizes=Sizes(gmv_users=args.gmv_users),
                  configs=args.configs, quick=args.quick, command=_command())
    print(json.dumps({"targets": res["targets"], "e2e_targets": res["e2e"]["targets"]}, indent=2))


def _models(args, out: Path) -> None:
    from recstack.bench.models import run

    res = run(out, data_dir=args.data, runs=args.runs, quick=args.quick, command=_command())
    print(json.dumps(res["targets"], indent=2))


def _train(args, out: Path) -> None:
    from recstack.bench.train_cost import ROWS
    from recstack.bench.train_cost import run as run_train

    rows = tuple(r.strip() for r in (args.rows or ",".join(ROWS)).split(",") if r.strip())
    res = run_train(args.data, out, rows=rows, manner=args.manner, steps=args.steps, repeats=args.repeats,
                    command=_command())
    print(json.dumps({r: v["cpu_ratio_vs_baseline"] for r, v in res["rows"].items()}, indent=2))


def _retrieval(args, out: Path) -> None:
    if not Path(args.checkpoint).is_file() and not (args.cache and Path(args.cache).is_file()):
        # refused before torch and the index code load (seconds), as every missing input is
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint (a retrieval run's checkpoint.pt)", args.checkpoint)
    import torch

    from recstack.bench.index_sweep import run_both

    torch.set_num_threads(1)  # ms per query single-threaded, as the targets are stated
    res = run_both(out, args.checkpoint, data_dir=args.data, n_queries=args.queries, n_timed=args.timed, k=args.k,
                   cache=args.cache)
    print(json.dumps({"serving_default": res["serving_default"], "targets": res.get("targets")}, indent=2, default=str))


def _cascade(args, out: Path) -> None:
    import tempfile

    from recstack.evaluation import cascade as cascade_eval

    runs = Path(args.artifacts)
    if not (runs / "retrieval" / "checkpoint.pt").exists():  # a bundle or an artifacts root
        results = cascade_eval.run(args.artifacts, args.data, out, n_users=args.users)
    else:  # a runs folder: exported to a bundle first
        from recstack.pipeline.export import export_bundle

        with tempfile.TemporaryDirectory(prefix="cascade_eval_") as tmp:
            bundle = export_bundle(runs, Path(tmp) / "artifacts")
            results = cascade_eval.run(bundle, args.data, out, n_users=args.users)
    cascade_eval.write_report(results, out)


def _soak(args, out: Path) -> None:
    from recstack.bench.soak import run

    res = run(args.artifacts, out, minutes=args.minutes, qps=args.qps, reload_every_s=args.reload_every,
              restart_every_min=args.restart_every, scratch=args.scratch, command=_command())
    print(json.dumps({"failed_calls": res["failed_calls"], "total_calls": res["total_calls"],
                      "max_abs_rss_drift": res["max_abs_rss_drift"]}, indent=2))


def _backends(args, out: Path) -> None:
    from recstack.bench.backends import run

    res = run(out, artifacts=args.artifacts, checkpoint=args.checkpoint, data_dir=args.data, n_items=args.items,
              n_queries=args.queries,
              milvus_queries=args.milvus_queries, probe_calls=args.probe_calls, k=args.k, nlist=args.nlist,
              nprobe=args.nprobe,
              milvus_index=args.milvus_index, e2e=not args.no_e2e,
              scratch=args.scratch or "/tmp/recstack-bench-backends", command=_command())
    print(json.dumps({b: res["retrieval"][b] for b in ("faiss", "milvus")}, indent=2))


def _mixed(args, out: Path) -> None:
    from recstack.bench.mixed import MixedConfig, run

    cfg = MixedConfig(qps=args.qps, events_per_s=args.events_per_s, batch=args.batch, duration_s=args.duration,
                      warmup_s=args.warmup, seed=args.seed)
    res = run(args.artifacts, args.data, out, cfg, store_spec=args.feature_store, scratch=args.scratch,
              command=_command())
    print(json.dumps(res["targets"], indent=2))


RUNNERS = {"backends": _backends, "soak": _soak, "all": _all, "retrieval": _retrieval, "cascade": _cascade, "models": _models, "train": _train}
RUNNERS["mixed"] = _mixed


def cmd_bench(args) -> int:
    for name in ("queries", "timed", "k", "users", "steps", "repeats", "gmv_users", "items", "nlist", "nprobe"):
        value = getattr(args, name, 1)
        if value is not None and value < 1:  # None: the default for the corpus
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = args.out or args.bench_out
    out = Path(out) if out else fresh_dir(args.what)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    since = time.time()
    made = [d for d in (out.parent, out) if not d.exists()]
    try:
        RUNNERS[args.what](args, out)
    except BaseException:
        for d in reversed(made):  # folders this run created and left without a file: leave nothing behind
            if d.is_dir() and not any(p.is_file() for p in d.rglob("*")):
                shutil.rmtree(d)
        raise
    print_written(out, since)
    return 0


def _add_backends(p: argparse.ArgumentParser) -> None:
    """The `bench backends` flags."""
    p.add_argument("--artifacts", default=None, help="a bundle: its vectors and index, and the end-to-end QPS")
    p.add_argument("--checkpoint", default=None, help="a retrieval checkpoint: its towers' vectors (no bundle needed)")
    p.add_argument("--data", default=None, help="with a training-state --checkpoint (train_state.pt): its world")
    p.add_argument("--items", type=int, default=100_000, help="synthetic corpus size, without a bundle or checkpoint")
    p.add_argument("--queries", type=int, default=300, help="calls (user row + its seeds) searched on FAISS")
    p.add_argument("--milvus-queries", type=int, default=40, help="the first N of those also searched on Milvus")
    p.add_argument("--probe-calls", type=int, default=5, help="of those, profiled again inside milvus-lite")
    p.add_argument("-k", type=int, default=1000, help="K of recall@K")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists without a bundle (default: the exporter's)")
    p.add_argument("--nprobe", type=int, default=48, help="IVF lists searched per query without a bundle")
    p.add_argument("--milvus-index", default="IVF_FLAT", choices=("IVF_FLAT", "FLAT"),
                   help="IVF_FLAT: FAISS's lists and nprobe; FLAT: exact, what `export --publish` publishes by default")
    p.add_argument("--no-e2e", action="store_true", help="with --artifacts: the retrieval part only")
    p.add_argument("--scratch", default=None, help="milvus-lite data (reused by a run on the same vectors) and logs "
                                                   "(default /tmp/recstack-bench-backends)")


def _add_mixed(p: argparse.ArgumentParser) -> None:
    """The `bench mixed` flags."""
    p.add_argument("--artifacts", required=True, help="the served bundle or an artifacts root")
    p.add_argument("--data", required=True, help="the bundle's world: test-day users, the corpus size")
    p.add_argument("--qps", type=float, default=50.0, help="Rank calls per second, both phases")
    p.add_argument("--events-per-s", type=float, default=200.0, help="events per second in the mixed phase")
    p.add_argument("--batch", type=int, default=10, help="events per LogEvents call")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of sending per phase")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of Rank before phase 1, reported apart")
    p.add_argument("--feature-store", default="",
                   help="the server's store (default: a fresh SQLite file in --scratch), e.g. redis://127.0.0.1:6379")
    p.add_argument("--scratch", default=None, help="server log and the default store (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="seeds the users and events drawn")


def add_parser(sub, formatter) -> None:
    """`bench` and its eight sub-parsers, on the `recstack` sub-parsers action `sub`."""
    b = sub.add_parser("bench", formatter_class=formatter,
                       help="benchmarks: all / retrieval / cascade / models / train / soak / backends / mixed (`recstack bench X --help`)",
                       description=__doc__)
    # also accepted before the benchmark's name (`recstack bench --out DIR models`)
    b.add_argument("--out", dest="bench_out", default=None, metavar="DIR", help="same as `recstack bench X --out DIR`")
    bs = b.add_subparsers(dest="what", required=True, metavar="BENCHMARK")

    def new(name: str, help: str) -> argparse.ArgumentParser:
        p = bs.add_parser(name, help=help, description=help, formatter_class=formatter)
        p.add_argument("--out", default=None, metavar="DIR",
                       help=f"report folder (default: a fresh ./runs/bench-{name}-<timestamp>/)")
        p.set_defaults(func=cmd_bench)
        return p

    p = new("all", "every section in one run: model costs, the retrieval point, the serving path, end to end "
                   "through gRPC with the single-stage and teacher-as-coarse peers, GMV@50 against the truth")
    p.formatter_class = type("AllHelp", (argparse.RawDescriptionHelpFormatter, formatter), {})  # the epilog as written
    p.description, p.epilog = textwrap.fill(p.description, 79), TEACHER_CHAIN
    p.add_argument("--artifacts", required=True, help="the served bundle or an artifacts root")
    p.add_argument("--data", required=True, help="the bundle's world (a `recstack simulate` folder)")
    p.add_argument("--teacher", required=True, metavar="TEACHER",
                   help="the trained PFD+MD teacher: a coarse run trained with `recstack train coarse --set "
                        "teacher=pfd_md --checkpoint-every N` (RUNS/coarse), or a teacher file; never trained here")
    p.add_argument("--scratch", default=None, help="scratch folder (teacher ONNX, server logs; default /tmp/recstack-bench)")
    p.add_argument("--gmv-users", type=int, default=100, help="users for GMV@50 against the truth")
    p.add_argument("--configs", default=None, help="end-to-end server configs (default cascade_w1,single_stage_w1,"
                                                   "teacher_coarse_w1; also cascade_w2, and cascade_cC_wW: "
                                                   "the cascade at coarse size C with W workers)")
    p.add_argument("--runs", default=None, help="runs folder with coarse/ and fine/checkpoint.pt (default: fresh models)")
    p.add_argument("--quick", action="store_true", help="small sizes and short load runs (a smoke test, not a report)")

    p = new("retrieval", "retrieval index sweep: recall@K vs latency of the index factories")
    p.add_argument("--checkpoint", required=True, help="RUNS/retrieval/checkpoint.pt")
    p.add_argument("--data", default=None, help="the world (default: the checkpoint's)")
    p.add_argument("--queries", type=int, default=500, help="test-day queries for recall")
    p.add_argument("--timed", type=int, default=200, help="queries timed for latency")
    p.add_argument("-k", type=int, default=1000, help="K of recall@K")
    p.add_argument("--cache", default=None, help="scratch .npz for the embeddings")

    p = new("cascade", "cascade recall and GMV@50 share against the simulator's truth, per stage size")
    p.add_argument("--artifacts", required=True, help="a bundle, an artifacts root or a runs folder")
    p.add_argument("--data", required=True, help="the bundle's world (a `recstack simulate` folder)")
    p.add_argument("--users", type=int, default=300, help="test-day users sampled")

    p = new("models", "coarse and fine model costs: inner product vs teacher DNN vs memory scan; ORT vs eager")
    p.add_argument("--runs", default=None, help="runs folder with coarse/ and fine/checkpoint.pt (default: fresh models)")
    p.add_argument("--data", default=None, help="a world: sizes the vocabulary and corpus")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not a report)")

    p = new("soak", "the service under mixed traffic for a long run: Reload every minute, SIGTERM/restart "
                    "cycles; failed calls, RSS drift per server life, p99 per minute")
    p.add_argument("--artifacts", required=True, help="a bundle or an artifacts root (two versions are made from it)")
    p.add_argument("--minutes", type=float, default=30.0, help="duration")
    p.add_argument("--qps", type=float, default=40.0, help="calls per second in all")
    p.add_argument("--reload-every", type=float, default=60.0, help="seconds between Reloads of both servers")
    p.add_argument("--restart-every", type=float, default=5.0, help="minutes between SIGTERM + restart of a server")
    p.add_argument("--scratch", default=None, help="scratch folder (bundles, server logs; default: a temporary one)")

    _add_backends(new("backends", "retrieval backends side by side: FAISS in process vs Milvus (milvus-lite server), "
                               "recall@K vs exact and p50/p99 per call; with --artifacts, end-to-end QPS at p99 <= 50 ms each"))

    _add_mixed(new("mixed", "Rank p50/p99 alone, then with an open-loop LogEvents sender beside it (same server); "
                            "failed calls of each, events acknowledged vs readable from the store afterwards"))

    p = new("train", "coarse training cost per teacher, relative to the student alone")
    p.add_argument("--data", required=True, help="a `recstack simulate` folder")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps per timed fit")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every row")
    p.add_argument("--rows", default=None, help="comma-separated teachers (default: all; baseline required)")
    p.add_argument("--manner", default="share_sync", help="training manner of the teachers")
