"""Importers: a public log -> a data folder of the contract (docs/DATA.md).

    recstack import taobao UserBehavior.csv --out data/taobao
    recstack import aliccp ali-ccp/ --out data/aliccp

Each streams its source in CSV blocks (pyarrow), maps the raw ids to dense ones (the raw id is
kept as `external_id`), writes the folder and then validates it (recstack.data.validate).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from recstack.data.importers.common import SourceError

FORMATS = ("taobao", "aliccp")

__all__ = ["FORMATS", "SourceError", "run_import"]


def run_import(fmt: str, src: str | Path, out: Path, *, force: bool = False, progress: bool = True,
               chunk_bytes: int = 64 << 20, overrides: tuple[str, ...] = ()) -> str:
    """Import `src` (format `fmt`) into `out`, the format's Config changed by `overrides`
    ("key=value", as `--set`); -> a one-line summary. SourceError (a
    ValueError) names the file, row and reason of a source it cannot read; a folder that
    then fails validation is a DataError listing the problems."""
    from tqdm import tqdm

    from recstack.config import apply_overrides
    from recstack.data.importers import common as C
    from recstack.data.loader import DataError
    from recstack.data.validate import validate

    src, out = Path(src), Path(out)
    if fmt not in FORMATS:
        raise SourceError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if not src.exists():
        raise SourceError(f"{src}: no such file or folder")
    if chunk_bytes < 1 << 10:
        raise SourceError(f"--chunk-mb: the CSV block must be at least 1 KiB, got {chunk_bytes} bytes")
    cfg_check = {"taobao": "recstack.data.importers.taobao:TaobaoConfig", "aliccp": "recstack.data.importers.aliccp:AliCCPConfig"}
    module, _, name = cfg_check[fmt].partition(":")
    apply_overrides(getattr(importlib.import_module(module), name)(), overrides)  # a bad --set fails before any write
    C.prepare_out(out, force)
    with tqdm(desc=f"import {fmt}", unit=" rows", unit_scale=True, disable=not progress) as bar:
        if fmt == "taobao":
            from recstack.data.importers.taobao import TaobaoConfig, import_taobao

            meta = import_taobao(src, out, apply_overrides(TaobaoConfig(), overrides), bar=bar, chunk_bytes=chunk_bytes)
        else:
            from recstack.data.importers.aliccp import AliCCPConfig, import_aliccp

            meta = import_aliccp(src, out, apply_overrides(AliCCPConfig(), overrides), bar=bar, chunk_bytes=chunk_bytes)
    problems = validate(out)
    if problems:
        raise DataError(f"{out}: the imported folder fails validation: " + "; ".join(p.line() for p in problems[:5]))
    v, days = meta["vocab"], meta["days"]
    return (f"wrote {out}/: {v['n_users']} users, {v['n_items']} items, {v['n_categories']} categories, "
            f"{meta['n_days']} days, {sum(d['impressions'] for d in days)} impressions, {meta['n_events']} behaviours "
            f"(valid; objective value column: {meta['objective_value']})")
