"""`recstack` — one console script, thin over the packages (each command imports what it needs
lazily, so `recstack serve` never loads torch or training code)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

STAGES = {"retrieval": "retrieval", "coarse": "coarse_rank", "fine": "fine_rank"}


def _cmd_simulate(args) -> int:
    from recstack.config import apply_overrides
    from recstack.world import preset, simulate

    cfg = apply_overrides(preset(args.preset), args.set)
    meta = simulate(cfg, args.seed, args.out, preset=args.preset, shard_rows=args.shard_rows)
    days = meta["days"]
    print(f"wrote {args.out}: {cfg.n_users} users, {cfg.n_items} items, {len(days)} days, "
          f"{sum(d['impressions'] for d in days)} impressions, {meta['n_events']} behaviours "
          f"in {meta['timings_s']['total']:.1f}s")
    for d in days:
        print(f"  day {d['day']}: {d['impressions']} impressions, CTR {d['ctr']:.4f}, CVR {d['cvr']:.4f}")
    return 0


def _cmd_train(args) -> int:
    from recstack import distributed
    from recstack.checkpoint import CheckpointError
    from recstack.config import apply_overrides

    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    mod = importlib.import_module(f"{STAGES[args.stage]}.train")
    cfg = apply_overrides(mod.Config(), args.set)
    out = Path(args.out) / args.stage
    # under torchrun (WORLD_SIZE > 1) join the process group; otherwise nothing changes
    world = distributed.init()
    try:
        metrics = mod.train(cfg, args.data, out, resume=args.resume, checkpoint_every=args.checkpoint_every)
    except CheckpointError as e:
        print(f"recstack train: error: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.destroy()
    if world.rank != 0:
        return 0
    print(f"{args.stage}: checkpoint {out / 'checkpoint.pt'}" + (f" ({world.size} processes)" if world.distributed else ""))
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


EXPERIMENTS = {  # name -> the package whose experiment.run(name, ...) writes the report
    "coarse": "coarse_rank", "lambda": "coarse_rank", "manner": "coarse_rank",
    "cvr": "fine_rank", "sead": "fine_rank", "signal-loss": "fine_rank",
}


def _cmd_experiment(args) -> int:
    try:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise ValueError("--seeds: at least one seed")
    mod = importlib.import_module(f"{EXPERIMENTS[args.name]}.experiment")
    if args.workers < 1:
        raise ValueError(f"--workers: must be >= 1, got {args.workers}")
    mod.run(args.name, args.data, args.out, seeds=seeds, quick=args.quick, overrides=tuple(args.set), workers=args.workers)
    print(f"wrote {Path(args.out) / 'report.md'}, results.json and plots")
    return 0


def _cmd_bench(args) -> int:
    import json

    if args.what == "models":
        from recstack.bench import run

        res = run(args.out or "docs/results/bench", data_dir=args.data, runs=args.runs, quick=args.quick,
                  command="recstack " + " ".join(sys.argv[1:]))
        print(json.dumps(res["targets"], indent=2))
        print(f"wrote {Path(args.out or 'docs/results/bench') / 'report.md'}, results.json and bench.png")
    elif args.what == "all":
        if not (args.artifacts and args.data):
            raise ValueError("bench all: --artifacts (the served bundle or artifacts root) and --data (its world) are required")
        from recstack.bench import run_all

        res = run_all(args.out or "docs/results/bench", data_dir=args.data, artifacts=args.artifacts,
                      scratch=args.scratch or "/tmp/recstack-bench", teacher=args.teacher, teacher_steps=args.teacher_steps,
                      runs=args.runs, gmv_users=args.gmv_users, configs=args.configs, quick=args.quick,
                      command="recstack " + " ".join(sys.argv[1:]))
        print(json.dumps({"targets": res["targets"], "e2e_targets": res["e2e"]["targets"]}, indent=2))
        print(f"wrote {Path(args.out or 'docs/results/bench') / 'report.md'}, results.json and plots")
    elif args.what == "soak":
        if not (args.artifacts and args.out):
            raise ValueError("bench soak: --artifacts (a bundle or artifacts root) and --out (report directory) are required")
        from recstack.soak import run as run_soak

        res = run_soak(args.artifacts, args.out, minutes=args.minutes, qps=args.qps, reload_every_s=args.reload_every,
                       restart_every_min=args.restart_every, scratch=args.scratch,
                       command="recstack " + " ".join(sys.argv[1:]))
        print(json.dumps({"failed_calls": res["failed_calls"], "total_calls": res["total_calls"],
                          "max_abs_rss_drift": res["max_abs_rss_drift"]}, indent=2))
        print(f"wrote {Path(args.out) / 'report.md'}, results.json and soak.png")
    elif args.what == "train":
        if not args.data:
            raise ValueError("bench train: --data (a `recstack simulate` world) is required")
        from coarse_rank.bench import ROWS
        from coarse_rank.bench import run as run_train

        rows = tuple(r.strip() for r in (args.rows or ",".join(ROWS)).split(",") if r.strip())
        res = run_train(args.data, args.out or "docs/results/coarse/cost", rows=rows, manner=args.manner,
                        steps=args.steps, repeats=args.repeats, command="recstack " + " ".join(sys.argv[1:]))
        print(json.dumps({r: v["cpu_ratio_vs_baseline"] for r, v in res["rows"].items()}, indent=2))
        print(f"wrote {Path(args.out or 'docs/results/coarse/cost') / 'report.md'}")
    elif args.what == "retrieval":
        if not args.checkpoint:
            raise ValueError("bench retrieval: --checkpoint RUNS/retrieval/checkpoint.pt is required")
        import torch

        from retrieval.bench import run_both

        torch.set_num_threads(1)  # ms per query single-threaded, as the targets are stated
        res = run_both(args.out or "docs/results/retrieval", args.checkpoint, data_dir=args.data,
                       n_queries=args.queries, n_timed=args.timed, k=args.k, cache=args.cache)
        print(json.dumps({"serving_default": res["serving_default"], "targets": res.get("targets")}, indent=2, default=str))
    else:
        if not (args.artifacts and args.data):
            raise ValueError("bench cascade: --artifacts (bundle, artifacts root or runs dir) and --data are required")
        from retrieval.cascade_eval import run

        run(args.artifacts, args.data, args.out or "docs/results/cascade", n_users=args.users)
        print(f"wrote {Path(args.out or 'docs/results/cascade') / 'report.md'}")
    return 0


def _cmd_export(args) -> int:
    from recstack.bundle import BundleError
    from recstack.checkpoint import CheckpointError
    from recstack.export import ExportError, export_bundle

    try:
        key = os.environ.get("RECSTACK_BUNDLE_KEY")  # when set, the manifest is HMAC-signed with it
        path = export_bundle(args.runs, args.out, signing_key=key.encode() if key else None)
    except (BundleError, CheckpointError, ExportError) as e:
        print(f"recstack export: error: {e}", file=sys.stderr)
        return 1
    print(f"bundle written: {path}")
    return 0


def _cmd_serve(args) -> int:
    from recstack.bundle import BundleError
    from recstack.serving.server import ServeError, serve

    token = os.environ.get("RECSTACK_ADMIN_TOKEN") or None  # never on the command line (visible in ps)
    if args.admin_token_file:
        token = Path(args.admin_token_file).read_text().strip() or None
    if bool(args.tls_cert) != bool(args.tls_key):
        print("recstack serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        return serve(args.artifacts, host=args.host, port=args.port, workers=args.workers, threads=args.threads,
                     max_queue=args.max_queue, onnx_threads=args.onnx_threads, grace_s=args.grace, admin_token=token,
                     tls_cert=args.tls_cert, tls_key=args.tls_key, reflection=not args.no_reflection,
                     metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                     bundle_key=os.environ.get("RECSTACK_BUNDLE_KEY") or None,
                     max_message_bytes=args.max_message_bytes)
    except BundleError as e:
        print(f"recstack serve: refusing the bundle: {e}", file=sys.stderr)
        return 1
    except ServeError as e:
        print(f"recstack serve: error: {e}", file=sys.stderr)
        return 1


def _cmd_loadtest(args) -> int:
    from recstack.loadtest import main_from_args

    return main_from_args(args)


def _cmd_rank(args) -> int:
    import grpc

    from recstack.serving.client import format_table, rank

    try:
        resp = rank(args.target, args.user_id, args.k, debug=True, timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"recstack rank: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(format_table(resp))
    return 0


def _cmd_quickstart(args) -> int:
    from recstack.quickstart import quickstart

    return quickstart(workdir=args.workdir, preset=args.preset, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recstack", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="simulate a world and write its Parquet logs")
    s.add_argument("--preset", default="small", choices=["tiny", "small", "medium", "large"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a WorldConfig field")
    s.add_argument("--shard-rows", type=int, default=None, metavar="N",
                   help="write each day's impressions as impressions/day=NN/part-*.parquet of N rows (e.g. 250000 "
                        "for large; training can then stream them, recstack.shards); default: one file per day")
    s.set_defaults(func=_cmd_simulate)

    s = sub.add_parser("train", help="train one stage from the logs (under torchrun: DDP over the processes)")
    s.add_argument("stage", choices=list(STAGES))
    s.add_argument("--data", required=True, help="a `recstack simulate` output directory")
    s.add_argument("--out", required=True, help="runs directory; the checkpoint goes to OUT/STAGE/checkpoint.pt")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field of the stage's Config")
    s.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="write the training state to OUT/STAGE/train_state.pt every N optimiser steps (0: never)")
    s.add_argument("--resume", action="store_true",
                   help="continue from OUT/STAGE/train_state.pt if it exists (same --set overrides; else start afresh)")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("experiment", help="run a paper table on a simulated world: report.md, results.json, plots")
    s.add_argument("name", choices=list(EXPERIMENTS))
    s.add_argument("--data", required=True, help="a `recstack simulate` output directory")
    s.add_argument("--out", required=True)
    s.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds (>= 3 for confidence intervals)")
    s.add_argument("--quick", action="store_true", help="tiny models and sweeps: checks the pipeline, numbers mean nothing")
    s.add_argument("--workers", type=int, default=1,
                   help="run independent fits in this many processes, one thread each (results equal a serial run's)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field of the stage's Config")
    s.set_defaults(func=_cmd_experiment)

    s = sub.add_parser("bench", help="every benchmark section in one run (all) / retrieval index sweep (recall@1000 vs"
                                     " latency) / cascade recall against the truth / coarse and fine model costs"
                                     " / coarse training cost per teacher (train)")
    s.add_argument("what", choices=["all", "retrieval", "cascade", "models", "train", "soak"],
                   help="all: every section in one run (models, retrieval point, serving path, end to end with peers)")
    s.add_argument("--teacher", default=None, help="all: PFD+MD teacher file (trained into --scratch when missing)")
    s.add_argument("--teacher-steps", type=int, default=600, help="all: training steps when the teacher is trained")
    s.add_argument("--scratch", default=None, help="all: scratch dir (teacher, ONNX, server logs; default /tmp/recstack-bench)")
    s.add_argument("--gmv-users", type=int, default=100, help="all: users for GMV@50 against the truth")
    s.add_argument("--configs", default=None, help="all: end-to-end server configs (default cascade_w1,single_stage_w1,"
                                                   "teacher_coarse_w1; also cascade_w2)")
    s.add_argument("--runs", default=None, help="models: runs dir with coarse/ and fine/checkpoint.pt (default: fresh models)")
    s.add_argument("--quick", action="store_true", help="models / all: small sizes and short load runs (a smoke test, "
                                                         "not a report)")
    s.add_argument("--checkpoint", help="retrieval: RUNS/retrieval/checkpoint.pt")
    s.add_argument("--artifacts", help="cascade / all: a bundle, artifacts root (or, cascade, a runs dir)")
    s.add_argument("--data", help="the world (retrieval default: the checkpoint's; models: sizes the vocabulary and corpus)")
    s.add_argument("--out", default=None, help="report directory (default docs/results/<what>)")
    s.add_argument("--queries", type=int, default=500)
    s.add_argument("--timed", type=int, default=200)
    s.add_argument("-k", type=int, default=1000)
    s.add_argument("--cache", default=None, help="scratch .npz for the embeddings")
    s.add_argument("--users", type=int, default=300)
    s.add_argument("--steps", type=int, default=200, help="train: optimiser steps per timed fit")
    s.add_argument("--repeats", type=int, default=3, help="train: interleaved repeats of every row")
    s.add_argument("--rows", default=None, help="train: comma-separated teachers (default all; baseline required)")
    s.add_argument("--manner", default="share_sync", help="train: training manner of the teachers")
    s.add_argument("--minutes", type=float, default=30.0, help="soak: duration")
    s.add_argument("--qps", type=float, default=40.0, help="soak: calls per second in all")
    s.add_argument("--reload-every", type=float, default=60.0, help="soak: seconds between Reloads of both servers")
    s.add_argument("--restart-every", type=float, default=5.0, help="soak: minutes between SIGTERM + restart of a server")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("export", help="write a versioned artifact bundle from trained checkpoints")
    s.add_argument("--runs", required=True)
    s.add_argument("--out", required=True, help="artifacts root: OUT/<version>/ plus the OUT/current pointer")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("serve", help="serve a bundle over gRPC")
    s.add_argument("--artifacts", required=True, help="a bundle directory or an artifacts root with a `current` pointer")
    s.add_argument("--host", default="127.0.0.1", help="listen address (loopback by default)")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT), ~one per core")
    s.add_argument("--threads", type=int, default=4, help="RPC threads per process")
    s.add_argument("--max-queue", type=int, default=None,
                   help="calls waiting beyond --threads before RESOURCE_EXHAUSTED (default 2 x threads)")
    s.add_argument("--onnx-threads", type=int, default=1, help="intra-op threads per ONNX session")
    s.add_argument("--grace", type=float, default=10.0, help="SIGTERM: seconds in-flight calls may take to finish")
    s.add_argument("--admin-token-file", default=None,
                   help="enables ModelService (reload, model info) for callers sending this token; "
                        "or set RECSTACK_ADMIN_TOKEN. Without either, ModelService is off")
    s.add_argument("--tls-cert", default=None, help="PEM server certificate chain (with --tls-key): serve TLS")
    s.add_argument("--tls-key", default=None, help="PEM private key")
    s.add_argument("--no-reflection", action="store_true", help="switch gRPC server reflection off")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics on this port (worker i: port + i; 0 = any free port)")
    s.add_argument("--metrics-host", default=None, help="listen address of /metrics (default: --host)")
    s.add_argument("--max-message-bytes", type=int, default=64 << 10, help="largest request accepted")
    s.set_defaults(func=_cmd_serve)

    from recstack.loadtest import add_arguments as loadtest_arguments

    s = sub.add_parser("loadtest", help="open-loop load test of a local server (p50..p99.9, --sweep, --json, --plot)")
    loadtest_arguments(s)
    s.set_defaults(func=_cmd_loadtest)

    s = sub.add_parser("rank", help="call the ranking service and print a table")
    s.add_argument("--target", default="127.0.0.1:50051")
    s.add_argument("--user-id", type=int, required=True)
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    s.set_defaults(func=_cmd_rank)

    s = sub.add_parser("quickstart", help="simulate small -> train -> export -> serve -> rank, on this machine")
    s.add_argument("--workdir", default="runs/quickstart")
    s.add_argument("--preset", default="small", choices=["tiny", "small", "medium"])
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    from recstack.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"recstack {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
