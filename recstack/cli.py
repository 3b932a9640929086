"""`recstack` — one console script, thin over the packages (each command imports what it needs
lazily, so `recstack serve` never loads torch or training code)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

STAGES = {"retrieval": "retrieval", "coarse": "coarse_rank", "fine": "fine_rank"}

# The project's own errors for bad input or a failed precondition, by module: each is looked
# up only if its module is loaded (an error of a module never imported cannot have been
# raised), so that `recstack serve` and `rank` do not import training code to catch them.
USER_ERRORS = {
    "recstack.data": "DataError", "recstack.training.checkpoint": "CheckpointError", "recstack.bundle": "BundleError",
    "recstack.pipeline.export": "ExportError", "retrieval.export": "ExportError", "coarse_rank.export": "ExportError",
    "fine_rank.export": "ExportError", "recstack.training.distributed": "DistributedError",
    "recstack.pipeline.publish": "PublishError",
}
TRACEBACK_ENV = "RECSTACK_TRACEBACK"  # set to 1: errors raise with their traceback (for bug reports)


class UsageError(ValueError):
    """A bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors raised (main prints them as one line) instead of exiting."""

    def error(self, message: str):
        err = UsageError(f"{message} (see `{self.prog} --help`)")
        err.prog = self.prog
        raise err


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, off, empty)."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d == [] or action.required:
            return action.help
        return super()._get_help_string(action)


def _required(args, *names: str) -> None:
    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n) in (None, "")]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)}")


def _write_json(path: Path, obj) -> None:
    """Whole or not at all: written beside, then renamed over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_plain(obj), indent=2) + "\n")
    os.replace(tmp, path)


def _plain(obj):
    """JSON types only: numpy scalars and arrays unwrapped, non-finite floats as null."""
    import math

    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy scalar or array
        return _plain(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _cmd_simulate(args) -> int:
    import shutil

    from recstack.config import apply_overrides, format_settings
    from recstack.world import preset, simulate

    cfg = apply_overrides(preset(args.preset), args.set)
    if args.list_settings:
        print(format_settings(cfg, f"WorldConfig, --preset {args.preset} (recstack simulate --set KEY=VALUE):"))
        return 0
    _required(args, "out")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not args.force:
            raise UsageError(f"--out {out}: the folder is not empty; pass --force to overwrite it")
        if (out / "world.json").exists() and (out / "impressions").is_dir():
            # a previous world: its impressions may be laid out differently (days, shards)
            shutil.rmtree(out / "impressions")
    meta = simulate(cfg, args.seed, out, preset=args.preset, shard_rows=args.shard_rows)
    days = meta["days"]
    print(f"wrote {out}/: {cfg.n_users} users, {cfg.n_items} items, {len(days)} days, "
          f"{sum(d['impressions'] for d in days)} impressions, {meta['n_events']} behaviours "
          f"in {meta['timings_s']['total']:.1f}s")
    for d in days:
        print(f"  day {d['day']}: {d['impressions']} impressions, CTR {d['ctr']:.4f}, CVR {d['cvr']:.4f}")
    print(f"  files: {', '.join(sorted(p.name + ('/' if p.is_dir() else '') for p in out.iterdir()))}")
    return 0


def _cmd_train(args) -> int:
    from recstack.training import distributed
    from recstack.config import apply_overrides, format_settings

    mod = importlib.import_module(f"{STAGES[args.stage]}.train")
    cfg = apply_overrides(mod.Config(), args.set)
    if args.list_settings:
        print(format_settings(cfg, f"{STAGES[args.stage]}.train.Config (recstack train {args.stage} --set KEY=VALUE):"))
        return 0
    _required(args, "data", "out")
    if not args.no_validate:
        from recstack.data.validate import require_valid

        require_valid(args.data)  # a bad folder stops here, each problem on its own line
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    out = Path(args.out) / args.stage
    # under torchrun (WORLD_SIZE > 1) join the process group; otherwise nothing changes
    world = distributed.init()
    try:
        metrics = mod.train(cfg, args.data, out, resume=args.resume, checkpoint_every=args.checkpoint_every)
    finally:
        distributed.destroy()
    if world.rank != 0:
        return 0
    # the stage printed its metrics; here they are kept, machine-readable, beside the checkpoint
    _write_json(out / "metrics.json", metrics)
    print(f"{args.stage}: wrote {out / 'checkpoint.pt'} and {out / 'metrics.json'}"
          + (f" ({world.size} processes)" if world.distributed else ""))
    return 0


EXPERIMENTS = {  # name -> the package whose experiments.run(name, ...) writes the report
    "coarse": "coarse_rank", "lambda": "coarse_rank", "manner": "coarse_rank",
    "cvr": "fine_rank", "sead": "fine_rank", "signal-loss": "fine_rank",
}


def _cmd_experiment(args) -> int:
    from recstack.cli_bench import print_written

    try:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise UsageError("--seeds: at least one seed")
    if args.workers < 1:
        raise UsageError(f"--workers: must be >= 1, got {args.workers}")
    if not (Path(args.data) / "world.json").is_file():  # before the report folder is made
        raise UsageError(f"--data {args.data}: no world.json (is this a `recstack simulate` output folder?)")
    mod = importlib.import_module(f"{EXPERIMENTS[args.name]}.experiments")
    since = time.time()
    mod.run(args.name, args.data, args.out, seeds=seeds, quick=args.quick, overrides=tuple(args.set), workers=args.workers)
    print_written(Path(args.out), since)
    return 0


def _cmd_export(args) -> int:
    from recstack.pipeline.export import export_bundle, export_stage, precision_summary

    if args.stage:
        result = export_stage(args.runs, args.stage, args.out)
        print(f"{args.stage} exported to {args.out}: {', '.join(str(f) for f in result['files'])} "
              "(each ONNX model carries its schema in metadata_props)")
        return 0

    key = os.environ.get("RECSTACK_BUNDLE_KEY")  # when set, the manifest is HMAC-signed with it
    path = export_bundle(args.runs, args.out, signing_key=key.encode() if key else None, value_column=args.value_column,
                         publish=args.publish, publish_index=args.publish_index)
    print(f"bundle written: {path}")
    for line in precision_summary(path):
        print(f"  {line}")
    return 0


def _cmd_serve(args) -> int:
    from recstack.bundle import BundleError
    from recstack.serving.process import ServeError, serve

    token = os.environ.get("RECSTACK_ADMIN_TOKEN") or None  # never on the command line (visible in ps)
    if args.admin_token_file:
        token = Path(args.admin_token_file).read_text().strip() or None
    if bool(args.tls_cert) != bool(args.tls_key):
        print("recstack serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if not args.max_queue_wait >= 0:
        print(f"recstack serve: --max-queue-wait must be >= 0 seconds, got {args.max_queue_wait}", file=sys.stderr)
        return 2
    if args.ingest_threads < 1 or (args.ingest_queue is not None and args.ingest_queue < 0):
        print(f"recstack serve: --ingest-threads must be >= 1 and --ingest-queue >= 0, got {args.ingest_threads} and "
              f"{args.ingest_queue}", file=sys.stderr)
        return 2
    from recstack.serving.candidates import parse_backend_uri
    try:
        parse_backend_uri(args.retrieval_backend)
    except ValueError as e:
        print(f"recstack serve: --retrieval-backend: {e}", file=sys.stderr)
        return 2
    try:
        return serve(args.artifacts, host=args.host, port=args.port, workers=args.workers, threads=args.threads,
                     max_queue=args.max_queue, max_queue_wait_s=args.max_queue_wait or None, onnx_threads=args.onnx_threads, grace_s=args.grace,
                     drain_notice_s=args.drain_notice, admin_token=token,
                     ingest_threads=args.ingest_threads, ingest_queue=args.ingest_queue,
                     tls_cert=args.tls_cert, tls_key=args.tls_key, reflection=not args.no_reflection,
                     metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                     bundle_key=os.environ.get("RECSTACK_BUNDLE_KEY") or None,
                     max_message_bytes=args.max_message_bytes, feature_store=args.feature_store,
                     impression_log=args.impression_log, log_roll_s=args.log_roll_s,
                     retrieval_backend=args.retrieval_backend,
                     retrieval_timeout_s=args.retrieval_timeout_ms / 1e3, clock_file=args.clock_file)
    except BundleError as e:
        print(f"recstack serve: refusing the bundle: {e}", file=sys.stderr)
        return 1
    except ServeError as e:
        print(f"recstack serve: error: {e}", file=sys.stderr)
        return 1


def _cmd_loadtest(args) -> int:
    from recstack.bench.loadtest import main_from_args

    return main_from_args(args)


def _cmd_quickstart(args) -> int:
    from recstack.pipeline.quickstart import quickstart

    return quickstart(workdir=args.workdir, preset=args.preset, seed=args.seed, fine_distill=args.fine_distill)


def _cmd_live(args) -> int:
    from recstack.pipeline.live import main_from_args

    return main_from_args(args)


def _add(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    from recstack import cli_bench, cli_rpc
    from recstack.data import commands as data_commands

    p = _Parser(prog="recstack", description=__doc__, formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"recstack {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _add(sub, "simulate", "simulate a world and write its Parquet logs", _cmd_simulate)
    s.add_argument("--preset", default="small", choices=["tiny", "small", "medium", "large"], help="world size")
    s.add_argument("--seed", type=int, default=0, help="random seed of the world and its traffic")
    s.add_argument("--out", default=None, metavar="DIR", help="output folder (required unless --list-settings)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a WorldConfig field (repeatable; --list-settings shows them)")
    s.add_argument("--shard-rows", type=int, default=None, metavar="N",
                   help="write each day's impressions as impressions/day=NN/part-*.parquet of N rows (e.g. 250000 "
                        "for large; training can then stream them, recstack.data.shards); default: one file per day")
    s.add_argument("--force", action="store_true", help="write into a non-empty --out folder (a previous world there is replaced)")
    s.add_argument("--list-settings", action="store_true",
                   help="print every --set key with its type, value for --preset and comment, then exit")

    s = _add(sub, "train", "train one stage from the logs (under torchrun: DDP over the processes)", _cmd_train)
    s.add_argument("stage", choices=list(STAGES), help="the stage to train")
    s.add_argument("--data", default=None, metavar="DIR",
                   help="a `recstack simulate` output folder (required unless --list-settings)")
    s.add_argument("--out", default=None, metavar="RUNS",
                   help="runs folder: writes OUT/STAGE/checkpoint.pt and metrics.json (required unless --list-settings)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the stage's Config (repeatable; --list-settings shows them)")
    s.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="write the training state to OUT/STAGE/train_state.pt every N optimiser steps (0: never)")
    s.add_argument("--resume", action="store_true",
                   help="continue from OUT/STAGE/train_state.pt if it exists (same --set overrides; else start afresh)")
    s.add_argument("--list-settings", action="store_true",
                   help="print every --set key of the stage with its type, default and comment, then exit")
    s.add_argument("--no-validate", action="store_true", help="skip the data check (`recstack validate`) before training")

    s = _add(sub, "experiment", "run a paper table on a simulated world: report.md, results.json, plots", _cmd_experiment)
    s.add_argument("name", choices=list(EXPERIMENTS), help="the experiment")
    s.add_argument("--data", required=True, metavar="DIR", help="a `recstack simulate` output folder")
    s.add_argument("--out", required=True, metavar="DIR", help="report folder")
    s.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds (>= 3 for confidence intervals)")
    s.add_argument("--quick", action="store_true", help="tiny models and sweeps: checks the pipeline, numbers mean nothing")
    s.add_argument("--workers", type=int, default=1,
                   help="run independent fits in this many processes, one thread each (results equal a serial run's)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of the experiment's plan (lrs=, fractions=, methods=, ...) or a field of the stage's Config")

    cli_bench.add_parser(sub, _Help)

    s = _add(sub, "export", "write a versioned artifact bundle from trained checkpoints", _cmd_export)
    s.add_argument("--runs", required=True, help="runs folder of `recstack train` (RUNS/{retrieval,coarse,fine}/)")
    s.add_argument("--out", required=True, help="artifacts root: OUT/<version>/ plus the OUT/current pointer "
                                                 "(with --stage: the folder for that stage's files)")
    s.add_argument("--stage", default=None, choices=list(STAGES),
                   help="export only this stage's models into --out (no bundle), each ONNX file self-describing")
    s.add_argument("--value-column", default=None, choices=["price", "value", "one"],
                   help="the objective pCTR x pCVR x VALUE: the items' price, their `value` column (margin, ...) or 1 "
                        "(default: the data folder's world.json objective_value, else price)")
    s.add_argument("--publish", default=None, metavar="URI",
                   help="also publish the item embeddings to milvus://HOST:PORT/COLLECTION (or milvus:///FILE.db/"
                        "COLLECTION), versioned by their checksum, before `current` moves")
    s.add_argument("--publish-index", default="FLAT", choices=("FLAT", "IVF_FLAT", "HNSW"),
                   help="the Milvus index type of the published collection")

    _serve_arguments(_add(sub, "serve", "serve a bundle over gRPC", _cmd_serve))

    from recstack.bench.loadtest import add_arguments as loadtest_arguments

    s = _add(sub, "loadtest", "open-loop load test of a local server (p50..p99.9, --sweep, --json, --plot)", _cmd_loadtest)
    loadtest_arguments(s)

    cli_rpc.add_parsers(sub, _add)
    data_commands.add_parsers(sub, _add)

    _add_quickstart(sub)
    _add_live(sub)
    return p


def _add_quickstart(sub) -> None:
    s = _add(sub, "quickstart", "simulate small -> train -> export -> serve -> rank, on this machine", _cmd_quickstart)
    s.add_argument("--workdir", default="runs/quickstart", help="everything is written under this folder")
    s.add_argument("--preset", default="small", choices=["tiny", "small", "medium"], help="world size")
    s.add_argument("--seed", type=int, default=0, help="random seed of the world")
    s.add_argument("--fine-distill", type=float, default=0.0, metavar="MU",
                   help="> 0: train the coarse stage again on the first bundle's fine order (coarse_rank fine_distill=MU; "
                        "3 on small keeps 71-72%% of the retrieved oracle items instead of 64-66%%) and serve that bundle; "
                        "about 4 more minutes on small; 0: off")


def _add_live(sub) -> None:
    s = _add(sub, "live", "serve, replay, retrain and reload day by day against a frozen arm (recstack.pipeline.live)",
             _cmd_live)
    s.add_argument("--out", default="runs/live", help="everything is written under this folder (resumed if it exists)")
    s.add_argument("--preset", default="small", choices=["tiny", "small", "medium"], help="world size when simulating")
    s.add_argument("--data", default=None, help="a world folder with >= initial + live days, instead of simulating one")
    for flag, typ, help_ in (("--days", int, "live days (default 7)"),
                             ("--initial-days", int, "days of the initial training window (default 4)"),
                             ("--sessions", int, "replayed sessions per arm per day (default 300)"),
                             ("--day-wall-s", float, "seconds a replayed day is compressed to (default 15)"),
                             ("--fine-distill", float, "day 0's coarse stage trained again on day 0's fine order with "
                                                       "this weight, as the quickstart's option (default 0: off)")):
        s.add_argument(flag, type=typ, default=None, help=help_)
    s.add_argument("--seed", type=int, default=0, help="random seed of the world")
    s.add_argument("--no-browsing", action="store_true",
                   help="the replay sends only the drawn clicks and purchases, not the users' own browsing")
    s.add_argument("--wall-clock", action="store_true",
                   help="the servers keep the wall clock instead of the simulated one (a replayed day then lasts "
                        "seconds: every replayed event counts as within the last hour)")


def _serve_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--artifacts", required=True, help="a bundle directory or an artifacts root with a `current` pointer")
    s.add_argument("--host", default="127.0.0.1", help="listen address (loopback by default)")
    s.add_argument("--port", type=int, default=50051, help="listen port")
    s.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT), ~one per core")
    s.add_argument("--threads", type=int, default=4, help="RPC threads per process")
    s.add_argument("--max-queue", type=int, default=None,
                   help="hard cap on calls waiting beyond --threads: beyond it RESOURCE_EXHAUSTED (default 16 x threads)")
    s.add_argument("--max-queue-wait", type=float, default=1.0,
                   help="seconds: a Rank call whose estimated queue wait is longer, or with its service longer than "
                        "its deadline, is refused at once (RESOURCE_EXHAUSTED); 0 = the deadline alone (default 1)")
    s.add_argument("--ingest-threads", type=int, default=2,
                   help="LogEvents calls writing to the feature store at once, on threads apart from Rank's")
    s.add_argument("--ingest-queue", type=int, default=None,
                   help="LogEvents calls waiting beyond --ingest-threads before RESOURCE_EXHAUSTED (default 3 x)")
    s.add_argument("--onnx-threads", type=int, default=1, help="intra-op threads per ONNX session")
    s.add_argument("--grace", type=float, default=10.0, help="SIGTERM: seconds in-flight calls may take to finish")
    s.add_argument("--drain-notice", type=float, default=1.0,
                   help="SIGTERM: seconds the server keeps taking calls after it turns NOT_SERVING, so that "
                        "health-watching clients move to other replicas before the listener closes")
    s.add_argument("--admin-token-file", default=None,
                   help="enables ModelService (reload, model info) for callers sending this token; "
                        "or set RECSTACK_ADMIN_TOKEN. Without either, ModelService is off")
    s.add_argument("--feature-store", default="",
                   help="online feature store for LogEvents: a SQLite path (default: feature_store.sqlite3 under the "
                        "artifacts root), redis://HOST:PORT, redis-cluster://HOST:PORT[,HOST:PORT...], or none")
    s.add_argument("--impression-log", default="",
                   help="folder of the impression and event logs (rolling Parquet; default: live_log/ under the "
                        "artifacts root), or none")
    s.add_argument("--log-roll-s", type=float, default=60.0,
                   help="seconds a log file stays open before it is finished and readable by training")
    s.add_argument("--tls-cert", default=None, help="PEM server certificate chain (with --tls-key): serve TLS")
    s.add_argument("--tls-key", default=None, help="PEM private key")
    s.add_argument("--no-reflection", action="store_true", help="switch gRPC server reflection off")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics on this port (worker i: port + i; 0 = any free port)")
    s.add_argument("--metrics-host", default=None, help="listen address of /metrics (default: --host)")
    s.add_argument("--max-message-bytes", type=int, default=64 << 10, help="largest request accepted")
    s.add_argument("--retrieval-backend", default="faiss",
                   help="faiss (the bundle's index, in process) | milvus://HOST:PORT/COLLECTION | "
                        "milvus:///PATH/FILE.db/COLLECTION (milvus-lite)")
    s.add_argument("--retrieval-timeout-ms", type=float, default=50.0,
                   help="the longest a remote retrieval call may take; past it Rank serves popularity candidates")
    s.add_argument("--clock-file", default="",
                   help="replays of simulated days only: the server's time is the number in this file (seconds since "
                        "the epoch), which the replay rewrites as its simulated time passes; default: the wall clock")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recstack")
    except PackageNotFoundError:  # run from a checkout without installing
        from recstack import __version__

        return __version__


def _error_status(e: BaseException) -> int | None:
    """The exit status for an error a user can cause (bad input, a missing or unreadable file, a
    refused precondition, a failed call); None for anything else: a bug, raised with its traceback."""
    if isinstance(e, ValueError):  # the project's type for bad input (ConfigError, UsageError, LoadTestError, ...)
        return 2
    if isinstance(e, OSError) and (e.filename is not None or isinstance(e, (ConnectionError, TimeoutError))):
        return 1
    for module, name in USER_ERRORS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return 1
    grpc = sys.modules.get("grpc")
    if grpc is not None and isinstance(e, grpc.RpcError):
        return 1
    return None


def _message(e: BaseException) -> str:
    grpc = sys.modules.get("grpc")
    if grpc is not None and isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        text = f"{e.code().name}: {e.details()}"
    elif isinstance(e, OSError) and e.filename is not None:
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = str(e) or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())  # one line, always


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error a user can cause is one line on stderr and a non-zero status."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"{getattr(e, 'prog', 'recstack')}: error: {e}", file=sys.stderr)
        return 2
    prog = " ".join(["recstack", args.command] + ([args.what] if args.command == "bench" else []))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted by _error_status; anything else is re-raised
        status = _error_status(e)
        if status is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"{prog}: error: {_message(e)}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
