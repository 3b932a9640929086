"""A data folder stripped to what a real log has (no simulator truth, no aggregates, no consent
or post-event columns; an item `value` column added) trains every stage, exports with the
objective's value column of the team's choice and serves, through the README's commands."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recstack.data import contract as K
from recstack.data.validate import validate


@pytest.fixture(scope="module")
def real_log(tiny_data, tmp_path_factory) -> Path:
    """The tiny world with only the contract's required columns (plus position and features),
    no aggregates.parquet and no truth files; items get value = 0.3 x price."""
    out = tmp_path_factory.mktemp("real_log")
    src = Path(tiny_data)
    shutil.copy(src / "world.json", out / "world.json")
    keep_users = ("user_id", "age_bucket", "gender", "activity")
    pq.write_table(pq.read_table(src / "users.parquet", columns=list(keep_users)), out / "users.parquet")
    items = pq.read_table(src / "items.parquet")
    value = pa.array(np.round(0.3 * items.column("price").to_numpy(), 2).astype(np.float32))
    pq.write_table(items.append_column("value", value), out / "items.parquet")
    shutil.copy(src / "events.parquet", out / "events.parquet")
    (out / "impressions").mkdir()
    for path in sorted((src / "impressions").glob("day=*.parquet")):
        cols = [*K.IMPRESSIONS.required_columns, "position"]
        pq.write_table(pq.read_table(path, columns=cols), out / "impressions" / path.name)
    return out


def test_real_log_is_valid_without_the_optional_files(real_log):
    assert not (real_log / "aggregates.parquet").exists() and not list(real_log.glob("truth_*"))
    assert "true_pctr" not in pq.read_schema(real_log / "impressions" / "day=01.parquet").names
    assert [p.line() for p in validate(real_log)] == []


def test_real_log_trains_exports_and_serves_by_value(real_log, tmp_path, train_export_serve, capsys):
    manifest, resp = train_export_serve(real_log, tmp_path, value_column="value", user_id=3, k=10)
    printed = capsys.readouterr().out
    # the truth-based metrics are skipped, each with its one-line note
    assert "ground-truth ceiling skipped: the data has no true_pctr" in printed
    assert "truth metrics skipped: the data has no true_pctr" in printed
    assert "truth metrics skipped: the data has no true_pcvr" in printed
    fine = json.loads((tmp_path / "runs" / "fine" / "metrics.json").read_text())
    assert "vs_aggregates" not in fine["cvr"] and fine["ctr"]["auc_truth"] is None and 0 < fine["ctr"]["auc"] < 1  # NaN -> null

    assert manifest["objective"] == {"score": "pctr * pcvr * value", "value_column": "value"}
    values = pq.read_table(real_log / "items.parquet").column("value").to_numpy()
    assert len(resp.items) == 10
    for it in resp.items:
        assert it.score == pytest.approx(it.pctr * it.pcvr * float(values[it.item_id]), rel=1e-5)
        assert it.price > 0 and values[it.item_id] != pytest.approx(it.price)  # scored by value, not by price
    scores = [it.score for it in resp.items]
    assert scores == sorted(scores, reverse=True)


def test_export_refuses_a_value_column_the_data_lacks(tiny_data):
    from recstack.data import load
    from recstack.pipeline.export import ExportError, objective_values

    data = load(tiny_data)  # the simulated world has prices but no `value` column
    assert objective_values(data, "price") == {} and objective_values(data, "one") == {}
    with pytest.raises(ExportError, match="needs a `value` column"):
        objective_values(data, "value")
    with pytest.raises(ExportError, match="--value-column must be one of"):
        objective_values(data, "margin")
