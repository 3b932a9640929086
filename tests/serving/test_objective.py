"""The objective's value column comes from the bundle manifest: price by default (a bundle
without the entry), `one`, or the snapshot's `value` column, which must be there and sane."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recstack import features as FE
from recstack.bundle import SNAPSHOT_ITEMS, Bundle, BundleError
from recstack.serving.objective import objective_of, read_values


def test_objective_of_the_manifest():
    assert objective_of({}) == "price"  # bundles written before the entry existed rank by price
    assert objective_of({"objective": {"value_column": "one"}}) == "one"
    with pytest.raises(BundleError, match="objective.value_column must be one of price, value, one, got 'margin'"):
        objective_of({"objective": {"value_column": "margin"}})
    with pytest.raises(BundleError, match="objective.value_column"):
        objective_of({"objective": "price"})


@pytest.fixture
def bundle_items(make_fake_bundle, tmp_path):
    bdir = make_fake_bundle(tmp_path / "artifacts")
    bundle = Bundle.open(bdir)
    it = pq.read_table(bdir / SNAPSHOT_ITEMS).to_pydict()
    items = FE.ItemTable(it["category"], it["shop"], it["brand"], it["price_bucket"], it["price"], 3.0, 1.0)
    return bdir, bundle, items


def test_read_values(bundle_items):
    bdir, bundle, items = bundle_items
    assert read_values(bundle, items)[0] == "price"
    np.testing.assert_array_equal(read_values(bundle, items)[1], items.price.astype(np.float64))
    as_one = Bundle(bdir, {**bundle.manifest, "objective": {"value_column": "one"}})
    assert read_values(as_one, items)[1].tolist() == [1.0] * items.n
    by_value = Bundle(bdir, {**bundle.manifest, "objective": {"value_column": "value"}})
    with pytest.raises(BundleError, match="objective.value_column is 'value' but the column cannot be read"):
        read_values(by_value, items)  # the snapshot has no value column
    table = pq.read_table(bdir / SNAPSHOT_ITEMS)
    value = np.linspace(0.0, 5.0, table.num_rows).astype(np.float32)
    pq.write_table(table.append_column("value", pa.array(value)), bdir / SNAPSHOT_ITEMS)
    np.testing.assert_allclose(read_values(by_value, items)[1], value)
    value[7] = -1.0
    pq.write_table(table.append_column("value", pa.array(value)), bdir / SNAPSHOT_ITEMS)
    with pytest.raises(BundleError, match="value must be finite and >= 0"):
        read_values(by_value, items)
