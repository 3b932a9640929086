"""The data commands of the CLI: `recstack validate DIR` and `recstack import FORMAT SRC --out DIR`."""
from __future__ import annotations

import sys
from pathlib import Path


def _cmd_validate(args) -> int:
    from recstack.data.validate import validate

    problems = validate(args.dir)
    for p in problems:
        print(p.line())
    if problems:
        print(f"recstack validate: {args.dir}: {len(problems)} problem(s) (the contract: docs/DATA.md)", file=sys.stderr)
        return 1
    print(f"{args.dir}: valid")
    return 0


def _cmd_import(args) -> int:
    from recstack.data.importers import run_import

    summary = run_import(args.format, args.src, Path(args.out), force=args.force, progress=not args.quiet,
                         chunk_bytes=args.chunk_mb << 20, overrides=tuple(args.set))
    print(summary)
    return 0


def add_parsers(sub, add) -> None:
    from recstack.data.importers import FORMATS

    s = add(sub, "validate", "check a data folder against the data contract (docs/DATA.md): one line per problem", _cmd_validate)
    s.add_argument("dir", metavar="DIR", help="a data folder (world.json, users/items/events.parquet, impressions/)")

    s = add(sub, "import", "convert a public log (Taobao UserBehavior, Ali-CCP) into a data folder, streaming", _cmd_import)
    s.add_argument("format", choices=list(FORMATS), help="the source format")
    s.add_argument("src", help="the source file (taobao: UserBehavior.csv) or folder (aliccp: the train/test CSVs)")
    s.add_argument("--out", required=True, metavar="DIR", help="the data folder to write")
    s.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    s.add_argument("--chunk-mb", type=int, default=64, help="CSV read block size in MiB (bounds memory)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the format's Config (taobao: start, n_days, negatives, seed, slice_rows; "
                        "aliccp: n_days); repeatable")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
