"""Assemble a serving bundle from trained checkpoints (`recstack export --runs RUNS --out ARTIFACTS`).

    RUNS/{retrieval,coarse,fine}/checkpoint.pt
      -> ARTIFACTS/<version>/{retrieval,coarse,fine}/...   (each stage's export.export)
         ARTIFACTS/<version>/features/...                 (feature-store snapshot)
         ARTIFACTS/<version>/manifest.json                 (checksums of all of the above)
      -> ARTIFACTS/current                                 (switched last, atomically)

The bundle is built in a hidden staging directory and renamed into place only once its
manifest is written, so a crash never leaves a half bundle under a version name, and
`current` never points at one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recstack import bundle as B
from recstack import bundle_files
from recstack import features as FE
from recstack import ids as IDS

# stage name (runs dir and bundle dir) -> module whose `export(checkpoint_path, out_dir)` builds it
STAGES = {"retrieval": "retrieval.export", "coarse": "coarse_rank.export", "fine": "fine_rank.export"}


class ExportError(RuntimeError):
    """Checkpoints that cannot make one consistent bundle."""


def write_feature_snapshot(bundle_dir: str | Path, users: dict, items: dict, behaviours: dict) -> list[str]:
    """Write the feature-store snapshot tables (columns as in recstack.bundle.SNAPSHOT_*).

    users: age_bucket, gender, activity (U,); items: category, shop, brand, price_bucket, price (I,);
    behaviours: user_id, seconds_ago, item_id, kind, dwell (N,). Raw 0-based ids. Returns the
    relative paths written.
    """
    bundle_dir = Path(bundle_dir)
    (bundle_dir / "features").mkdir(parents=True, exist_ok=True)
    n_users, n_items = len(users["age_bucket"]), len(items["price"])
    user_table = pa.table({
        "user_id": np.arange(n_users, dtype=np.int64),
        **{k: np.asarray(users[k], dtype=np.int64) for k in ("age_bucket", "gender", "activity")},
    })
    item_table = pa.table({
        "item_id": np.arange(n_items, dtype=np.int64),
        **{k: np.asarray(items[k], dtype=np.int64) for k in ("category", "shop", "brand", "price_bucket")},
        "price": np.asarray(items["price"], dtype=np.float32),
        # the objective's value column, when the bundle's objective names one (recstack.serving.objective)
        **({"value": np.asarray(items["value"], dtype=np.float32)} if "value" in items else {}),
    })
    user_id = np.asarray(behaviours["user_id"], dtype=np.int64)
    seconds_ago = np.asarray(behaviours["seconds_ago"], dtype=np.float64)
    order = np.lexsort((seconds_ago, user_id))  # user-major, newest first
    beh_table = pa.table({
        "user_id": user_id[order],
        "seconds_ago": seconds_ago[order],
        "item_id": np.asarray(behaviours["item_id"], dtype=np.int64)[order],
        "kind": np.asarray(behaviours["kind"], dtype=np.int8)[order],
        "dwell": np.asarray(behaviours["dwell"], dtype=np.float32)[order],
    })
    for rel, table in ((B.SNAPSHOT_USERS, user_table), (B.SNAPSHOT_ITEMS, item_table), (B.SNAPSHOT_BEHAVIOURS, beh_table)):
        pq.write_table(table, bundle_dir / rel)
    return [B.SNAPSHOT_USERS, B.SNAPSHOT_ITEMS, B.SNAPSHOT_BEHAVIOURS]


def objective_values(data, value_column: str) -> dict:
    """The items' extra snapshot column for `value_column` ({} for price and one) -> {"value": (I,)}.
    ExportError when the data has no usable `value` column."""
    from recstack.serving.objective import VALUE_COLUMNS

    if value_column not in VALUE_COLUMNS:
        raise ExportError(f"--value-column must be one of {', '.join(VALUE_COLUMNS)}, got {value_column!r}")
    if value_column != "value":
        return {}
    v = np.asarray(data.item_value, np.float64)
    if not (np.all(np.isfinite(v)) and np.all(v >= 0)):
        raise ExportError(f"--value-column value: {data.root}/items.parquet needs a `value` column, finite and >= 0 "
                          f"for every item ({int(np.count_nonzero(~np.isfinite(v) | (v < 0)))} items are not)")
    return {"value": v}


def snapshot_from_data(data, bundle_dir: str | Path, seq_len: int = FE.SEQ_LEN, value_column: str = "price"
                       ) -> tuple[list[str], dict]:
    """Snapshot a simulated world as of the end of its logs (world.json `now`).

    Keeps each user's last `seq_len` clicks / purchases (the most the sequence models see) and
    every event of any kind in the interacted features' longest window (7 d), from which the
    server counts them as training does (recstack.interacted); the items carry
    the `value` column when `value_column` is "value". Returns the relative paths written and
    the snapshot's manifest entry.
    """
    if "now" in data.world:
        now = float(data.world["now"])
    else:  # day d spans [(history_days + d - 1), (history_days + d)) x 86400 s
        now = float((data.world.get("history_days", 0) + data.n_days) * data.world.get("day_seconds", 86400))
    users = np.arange(data.users.n, dtype=np.int64)
    idx = data.behaviours.last_indices(users, np.full(len(users), now), seq_len)  # (U, L), -1 = empty
    beh = data.behaviours
    window = max(hours for *_, hours in FE.INTERACTED_SPEC) * 3600.0
    rows = idx[idx >= 0]
    rows = rows[beh.ts[rows] < now - window]  # the sequence's older part; the window comes from the full log
    ev = data.events
    recent = np.flatnonzero((ev["ts"] >= now - window) & (ev["ts"] < now))  # every kind: the interacted features
    files = write_feature_snapshot(
        bundle_dir,
        users={"age_bucket": data.users.cols[:, 0] - 1, "gender": data.users.cols[:, 1] - 1, "activity": data.users.cols[:, 2] - 1},
        items={
            "category": data.items.cols[:, 0] - 1, "shop": data.items.cols[:, 1] - 1, "brand": data.items.cols[:, 2] - 1,
            "price_bucket": data.items.cols[:, 3] - 1, "price": data.items.price,
            **objective_values(data, value_column),
        },
        behaviours={
            "user_id": np.concatenate([beh.user[rows], ev["user_id"][recent]]),
            "seconds_ago": np.concatenate([now - beh.ts[rows], now - ev["ts"][recent]]),
            "item_id": np.concatenate([beh.item[rows], ev["item_id"][recent]]),
            "kind": np.concatenate([beh.kind[rows], ev["kind"][recent]]),
            "dwell": np.concatenate([beh.dwell[rows], ev["dwell"][recent]]),
        },
    )
    n_beh = int(len(rows) + len(recent))
    meta = {"time": now, **_epoch(data, now), "n_users": int(data.users.n), "n_items": int(data.items.n), "n_behaviours": n_beh,
            "seq_len": seq_len, "data_dir": str(data.root)}
    return files, meta


def _epoch(data, now: float) -> dict:
    """{"epoch": the snapshot's time in seconds since the epoch} for data whose times are
    absolute (a world written from a server's log: `origin_epoch`); {} otherwise, and the
    snapshot's time is then the bundle's export time (recstack.serving.loading.snapshot_time)."""
    origin = data.world.get("origin_epoch")
    return {"epoch": float(origin) + now} if origin is not None else {}


def write_id_maps(data_dir: str | Path, bundle_dir: str | Path, n_users: int, n_items: int) -> list[str]:
    """Copy the data's `external_id` columns (users.parquet, items.parquet), where present, into
    the bundle's id files, checked (no nulls, no repeats, one per row). -> relative paths written."""
    written = []
    for table, rel, n in (("users.parquet", bundle_files.IDS_USERS, n_users),
                          ("items.parquet", bundle_files.IDS_ITEMS, n_items)):
        external = IDS.read_external(Path(data_dir) / table)
        if external is None:
            continue
        try:
            external = IDS.check_external(external, n, f"{Path(data_dir) / table} column {IDS.EXTERNAL_ID!r}")
        except IDS.IdError as e:
            raise ExportError(str(e)) from None
        IDS.write_external(Path(bundle_dir) / rel, external)
        written.append(rel)
    return written


def describe_models(stage_dir: str | Path, stage: str, names: list[str], vocab: dict, version: str) -> None:
    """Write each ONNX file's schema into its metadata_props (recstack.model_schema); `names` are
    the exporter's file names under `stage_dir`, each ONNX one's role its name in recstack.bundle_files."""
    from recstack.training.onnx import describe

    roles = {name: role for role, name in bundle_files.FILES.get(stage, {}).items()}
    for name in names:
        if str(name).endswith(".onnx"):
            describe(Path(stage_dir) / name, stage, roles.get(Path(name).as_posix(), Path(name).stem), vocab, version)


def export_stage(runs_dir: str | Path, stage: str, out_dir: str | Path) -> dict:
    """Export one trained stage on its own (no bundle, no manifest): its exporter's files in
    `out_dir`, every ONNX model carrying its schema (bundle_version ""). -> the exporter's
    {"files": [...], "meta": {...}}."""
    import importlib

    from recstack.training import checkpoint as C

    if stage not in STAGES:
        raise ExportError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    ckpt_path = Path(runs_dir) / stage / "checkpoint.pt"
    if not ckpt_path.exists():
        raise ExportError(f"missing checkpoint: {ckpt_path} (run `recstack train {stage} --out {runs_dir}`)")
    vocab = C.load(ckpt_path, stage=stage)["vocab"]
    mod = importlib.import_module(STAGES[stage])
    try:
        result = mod.export(ckpt_path, Path(out_dir))
    except getattr(mod, "ExportError", ExportError) as e:
        raise ExportError(f"{stage}: {e}") from e
    describe_models(out_dir, stage, result["files"], vocab, "")
    return result


def check_finite(bundle_dir: str | Path, files: list[str]) -> None:
    """Refuse model files holding NaN or infinity (.npy arrays, ONNX weights, the FAISS index):
    an honest export of a diverged model would otherwise be checksummed and served. Raises
    ExportError naming the file."""
    import faiss

    from recstack.serving.loading import check_index_finite

    for rel in files:
        try:
            if rel.endswith(".faiss"):
                check_index_finite(faiss.read_index(str(B.safe_path(bundle_dir, rel))), rel)
            else:
                B.check_file(bundle_dir, rel)
        except B.BundleError as e:
            raise ExportError(f"refusing to export: {e}") from None


def check_int8_fine(bundle_dir: Path, files: list[str], fine_meta: dict, min_overlap: float | None = None) -> bool:
    """The served top-50 check of an int8 fine graph the fine exporter kept (held-out AUC and
    calibration already passed): it runs on the complete staged bundle. Records the result in
    fine_meta["int8"]; on failure removes the graph from `files` and disk. -> whether it ran
    (the manifest is then stale)."""
    from recstack.bundle_files import FINE_RANKER_INT8
    from recstack.pipeline.fine_check import served_top_overlap

    if FINE_RANKER_INT8 not in files:
        return False
    check = served_top_overlap(bundle_dir, min_overlap=min_overlap)
    fine_meta["int8"]["served_top"] = check
    top = (f"served top-{check['top_k']} overlap with float32 {check['mean_overlap']:.4f} "
           f"{'>=' if check['passed'] else '<'} {check['min_overlap']} over {check['users']} users")
    fine_meta["int8"]["reason"] += f"; {top}"
    if not check["passed"]:
        fine_meta["int8"]["kept"] = False
        files.remove(FINE_RANKER_INT8)
        (bundle_dir / FINE_RANKER_INT8).unlink()
    return True


def _staging_dir(out_dir: Path, version: str | None) -> tuple[str, Path]:
    """A version name free under `out_dir` and an empty hidden directory to build it in.

    An explicit version must be free; a generated one (timestamp) gets -1, -2, ... on a clash.
    """
    if version:
        B.check_version_name(version)
        if (out_dir / version).exists():
            raise ExportError(f"bundle version {version!r} already exists in {out_dir}")
        name = version
    else:
        base = B.new_version()
        name = next((n for n in (base, *(f"{base}-{i}" for i in range(1, 1000))) if not (out_dir / n).exists()), None)
        if name is None:
            raise ExportError(f"cannot find a free version name for {base!r} in {out_dir}")
    staging = out_dir / f".staging-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return name, staging


def export_bundle(runs_dir: str | Path, out_dir: str | Path, version: str | None = None,
                  signing_key: bytes | None = None, value_column: str | None = None, publish: str | None = None,
                  publish_index: str = "FLAT") -> Path:
    """Export the three trained stages + a feature snapshot as one verified bundle; returns its directory.

    The ranking objective is pCTR x pCVR x `value_column` ("price", "value" or "one"; None:
    the data folder's world.json `objective_value`, else "price"), written into the manifest.

    `out_dir` is the artifacts root; the new bundle becomes `out_dir/<version>` and `current`
    points at it once it is complete and verified. With `signing_key`, the manifest carries
    its HMAC (servers configured with the key refuse bundles without a valid one). With
    `publish` (a milvus:// URI), the item embeddings are published to that backend's versioned
    collection (recstack.pipeline.publish, `publish_index` its index type) before `current`
    moves; if publishing fails, the bundle stays written but `current` does not move.
    """
    import importlib

    from recstack.training import checkpoint as C
    from recstack import data as D

    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    ckpt_paths = {stage: runs_dir / stage / "checkpoint.pt" for stage in STAGES}
    missing = [str(p) for p in ckpt_paths.values() if not p.exists()]
    if missing:
        raise ExportError(f"missing checkpoints: {', '.join(missing)} (run `recstack train STAGE --out {runs_dir}`)")
    ckpts = {stage: C.load(path, stage=stage) for stage, path in ckpt_paths.items()}
    vocabs = {stage: ck["vocab"] for stage, ck in ckpts.items()}
    if any(v != vocabs["retrieval"] for v in vocabs.values()):
        raise ExportError("the checkpoints were trained on different worlds (vocab differs): "
                          + ", ".join(f"{s}: {v.get('n_users')} users / {v.get('n_items')} items" for s, v in vocabs.items()))
    data_dir = ckpts["retrieval"]["data_dir"]

    out_dir.mkdir(parents=True, exist_ok=True)
    version, staging = _staging_dir(out_dir, version)
    try:
        files: list[str] = []
        stages: dict[str, dict] = {}
        for stage, module in STAGES.items():
            mod = importlib.import_module(module)
            try:
                result = mod.export(ckpt_paths[stage], staging / stage)
            except getattr(mod, "ExportError", ExportError) as e:  # each exporter has its own class
                raise ExportError(f"{stage}: {e}") from e
            stage_files = [f"{stage}/{Path(f).as_posix()}" for f in result["files"]]
            describe_models(staging / stage, stage, result["files"], vocabs[stage], version)
            check_finite(staging, stage_files)
            files += stage_files
            stages[stage] = {"dir": stage, "files": stage_files, "meta": result.get("meta", {}),
                             "metrics": ckpts[stage].get("metrics", {}), "checkpoint": str(ckpt_paths[stage])}
        data = D.load(data_dir)
        value_column = value_column or data.world.get("objective_value", "price")
        snap_files, snapshot = snapshot_from_data(data, staging, value_column=value_column)
        files += snap_files + write_id_maps(data_dir, staging, data.users.n, data.items.n)
        objective = {"score": "pctr * pcvr * value", "value_column": value_column}

        def manifest() -> None:
            B.write_manifest(
                staging, version=version, files=files,
                configs={stage: ck["config"] for stage, ck in ckpts.items()},
                feature_schema=FE.feature_schema(), vocab=vocabs["retrieval"], stages=stages,
                extra={"snapshot": snapshot, "objective": objective}, signing_key=signing_key,
            )
            B.verify_bundle(staging, signing_key)

        manifest()
        if check_int8_fine(staging, files, stages["fine"]["meta"]):
            manifest()  # with the check's result (and without the int8 graph if it failed)
        final = out_dir / version
        os.rename(staging, final)  # fails rather than overwrite if the name was taken meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if publish:
        from recstack.pipeline.publish import publish_bundle

        publish_bundle(final, publish, index_type=publish_index)
    B.write_current(out_dir, version)
    return final.resolve()


def precision_summary(bundle_dir: str | Path) -> list[str]:
    """One line per quantised stage of a written bundle: what serves, and why."""
    stages = B.Bundle.open(bundle_dir, verify=False).manifest.get("stages", {})
    lines = []
    coarse = stages.get("coarse", {}).get("meta", {}).get("item_vectors_int8")
    if coarse:
        lines.append(f"coarse item vectors: {'int8' if coarse['served'] else 'float32'} ({coarse['reason']})")
    fine = stages.get("fine", {}).get("meta", {}).get("int8")
    if fine:
        lines.append(f"fine ranker: {'int8' if fine['kept'] else 'float32'} ({fine['reason']})")
    return lines
