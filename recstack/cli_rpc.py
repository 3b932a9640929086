"""The client commands of `recstack`: `rank` (RankingService) and the admin commands `reload`
and `model-info` (ModelService). Errors of the calls surface as grpc.RpcError, which the CLI
prints as one line `CODE: details`."""
from __future__ import annotations

import json
import os
from pathlib import Path

TOKEN_ENV = "RECSTACK_ADMIN_TOKEN"
KINDS = ("click", "purchase")


def parse_behaviour(text: str) -> dict:
    """"ITEM[:KIND[:SECONDS_AGO[:DWELL_SECONDS]]]" -> the keyword arguments of client.behaviour."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 4 or not parts[0].strip():
        raise ValueError(f"--behaviour {text!r}: expected ITEM[:KIND[:SECONDS_AGO[:DWELL_SECONDS]]]")
    try:
        item = int(parts[0])
    except ValueError:
        raise ValueError(f"--behaviour {text!r}: the item id {parts[0]!r} is not an integer") from None
    kind = (parts[1].strip().lower() if len(parts) > 1 and parts[1].strip() else "click")
    if kind not in KINDS:
        raise ValueError(f"--behaviour {text!r}: the kind must be one of {', '.join(KINDS)}, got {kind!r}")
    numbers = []
    for name, value in zip(("seconds ago", "dwell seconds"), parts[2:]):
        try:
            numbers.append(float(value) if value.strip() else 0.0)
        except ValueError:
            raise ValueError(f"--behaviour {text!r}: {name} {value!r} is not a number") from None
    seconds_ago, dwell = (numbers + [0.0, 0.0])[:2]
    return {"item_id": item, "kind": kind, "seconds_ago": seconds_ago, "dwell_seconds": dwell}


def message_dict(msg) -> dict:
    """Every field of a protobuf message as plain JSON types (ints stay ints, enums by name),
    unset sub-messages left out."""
    out = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        repeated = getattr(field, "is_repeated", None)
        repeated = repeated if repeated is not None else field.label == field.LABEL_REPEATED
        if field.message_type is not None:
            if repeated:
                out[field.name] = [message_dict(v) for v in value]
            elif msg.HasField(field.name):
                out[field.name] = message_dict(value)
        elif field.enum_type is not None:
            name = lambda v: field.enum_type.values_by_number[v].name if v in field.enum_type.values_by_number else v  # noqa: E731
            out[field.name] = [name(v) for v in value] if repeated else name(value)
        else:
            out[field.name] = list(value) if repeated else value
    return out


def admin_token(token_file: str | None) -> str:
    """The admin token: the first line of `token_file`, else $RECSTACK_ADMIN_TOKEN (never a
    command-line value: those are visible to every user in `ps`)."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"--admin-token-file {token_file}: the file is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ValueError(f"no admin token: pass --admin-token-file FILE or set {TOKEN_ENV} "
                         "(the token the server was started with)")
    return token


def _admin_call(args, fn, **kw):
    import grpc

    token = admin_token(args.admin_token_file)
    try:
        return fn(args.target, admin_token=token, timeout=args.timeout, tls_ca=args.tls_ca, **kw)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise ValueError(f"the server at {args.target} has no ModelService: it was started without an admin token "
                             f"(recstack serve --admin-token-file FILE, or {TOKEN_ENV})") from None
        raise


def format_info(info) -> str:
    lines = [f"model {info.model_version}  (bundle {info.bundle_path})",
             f"  exported {info.created}, loaded {info.loaded_at} by pid {info.pid} (worker {info.worker})",
             f"  {info.n_users} users, {info.n_items} items"]
    if info.HasField("limits"):
        lim = info.limits
        lines.append(f"  limits: num_results {lim.num_results_default} (max {lim.num_results_max}), retrieval_size "
                     f"{lim.retrieval_size_default} (max {lim.retrieval_size_max}), coarse_size {lim.coarse_size_default} "
                     f"(max {lim.coarse_size_max}), behaviours max {lim.behaviours_max}")
    if info.last_load_error:
        lines.append(f"  last refused load: {info.last_load_error}")
    return "\n".join(lines)


def cmd_rank(args) -> int:
    from recstack.serving.client import format_table, rank

    behaviours = [parse_behaviour(b) for b in args.behaviour]
    resp = rank(args.target, args.user_id, args.k, behaviours, debug=True, timeout=args.timeout,
                retrieval_size=args.retrieval_size, coarse_size=args.coarse_size, tls_ca=args.tls_ca)
    print(json.dumps(message_dict(resp), indent=2) if args.json else format_table(resp))
    return 0


def cmd_model_info(args) -> int:
    from recstack.serving.client import model_info

    info = _admin_call(args, model_info)
    print(json.dumps(message_dict(info), indent=2) if args.json else format_info(info))
    return 0


def cmd_reload(args) -> int:
    from recstack.serving.client import reload

    info = _admin_call(args, reload, version=args.version)
    if args.json:
        print(json.dumps(message_dict(info), indent=2))
    else:
        print(f"reloaded: serving {info.model_version} from {info.bundle_path} (pid {info.pid}, worker {info.worker})")
    return 0


def cmd_replay(args) -> int:
    from recstack.pipeline.replay import ReplayConfig, format_report, replay

    cfg = ReplayConfig(day=args.day, sessions=args.sessions, speedup=args.speedup, max_wait_s=args.max_wait, k=args.k,
                       seed=args.seed, timeout_s=args.timeout, browsing=not args.no_browsing)
    if args.split:
        from recstack.pipeline.replay_split import format_split, parse_split, replay_split

        report = replay_split(parse_split(args.split), args.data, cfg, design=args.split_design)
        print(json.dumps(report, indent=2) if args.json else format_split(report))
        return 0 if all(r["requests"] for r in report["arms"].values()) else 1
    report = replay(args.target, args.data, cfg)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["requests"] else 1


def _common(p, timeout: float) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="the server, HOST:PORT")
    p.add_argument("--timeout", type=float, default=timeout, help="deadline of the call in seconds")
    p.add_argument("--tls-ca", default=None, help="PEM file: use TLS and verify the server against it")
    p.add_argument("--json", action="store_true", help="print the response as JSON instead of text")


def _admin(p) -> None:
    p.add_argument("--admin-token-file", default=None,
                   help=f"file holding the server's admin token (default: ${TOKEN_ENV})")


def add_parsers(sub, add) -> None:
    """`rank`, `reload` and `model-info`; `add(sub, name, help, func)` makes one sub-parser."""
    p = add(sub, "rank", "call the ranking service for one user and print the ranked items", cmd_rank)
    p.add_argument("--user-id", type=int, required=True, help="raw user id (unknown ids are served as a cold start)")
    p.add_argument("-k", type=int, default=10, help="number of items to return (num_results)")
    p.add_argument("--behaviour", action="append", default=[], metavar="ITEM[:KIND[:SECONDS_AGO[:DWELL]]]",
                   help="a recent behaviour to send with the request (repeatable; KIND click or purchase, "
                        "default click 0 s ago), e.g. --behaviour 123:click:30 --behaviour 77:purchase:600")
    p.add_argument("--retrieval-size", type=int, default=0, help="candidates out of retrieval (0: server default)")
    p.add_argument("--coarse-size", type=int, default=0, help="candidates out of the coarse ranker (0: server default)")
    _common(p, 5.0)

    p = add(sub, "replay", "send a simulated day's sessions to a server and their clicks / purchases (drawn from "
                           "the world's truth) back through LogEvents; report online CTR, conversions, GMV", cmd_replay)
    p.add_argument("--target", default="127.0.0.1:50051", help="the server, HOST:PORT")
    p.add_argument("--data", required=True, help="the simulated world (`recstack simulate --out`) the bundle was trained on")
    p.add_argument("--day", type=int, default=0, help="the day to replay (0: the world's test day)")
    p.add_argument("--sessions", type=int, default=200, help="sessions replayed (a seeded sample, in time order)")
    p.add_argument("--speedup", type=float, default=3600.0, help="simulated seconds per wall-clock second")
    p.add_argument("--max-wait", type=float, default=2.0, help="longest pause between two sessions, in seconds")
    p.add_argument("-k", type=int, default=10, help="items asked for per call")
    p.add_argument("--seed", type=int, default=0, help="the session sample and the click / purchase draws")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of each call in seconds")
    p.add_argument("--no-browsing", action="store_true",
                   help="send only the drawn clicks and purchases, not the users' own browsing of the day "
                        "(the world log's views, favourites, add-to-carts)")
    p.add_argument("--split", default="", metavar="A=HOST:PORT,B=HOST:PORT",
                   help="an A/B test of two servers (e.g. two bundle versions): B - A per request with its 95%% CI")
    p.add_argument("--split-design", choices=("paired", "users"), default="paired",
                   help="paired: every session to both arms, differences per session (simulated users only); "
                        "users: users split by a hash of their id, Welch interval (default: paired)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = add(sub, "model-info", "which model the server is serving (ModelService, needs the admin token)",
            cmd_model_info)
    _common(p, 10.0)
    _admin(p)

    p = add(sub, "reload", "make the server load a bundle version, verified and warmed before it takes traffic "
                           "(ModelService, needs the admin token; with `serve --workers N` one worker answers)",
            cmd_reload)
    p.add_argument("--version", default="", help="a version folder under the server's artifacts root "
                                                 "('': follow its `current` pointer)")
    _common(p, 120.0)
    _admin(p)
