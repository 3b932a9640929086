"""The ranking objective's value column: the fine stage orders by pCTR x pCVR x value.

The bundle says which value in its manifest, `objective.value_column`:
  "price"  the snapshot's item price (the default, and what a bundle without the entry means)
  "value"  the snapshot's `value` column (a margin, or whatever a purchase is worth to the team)
  "one"    1 for every item: expected purchases, for data without prices
`recstack export --value-column` writes it (recstack.pipeline.export); this module reads it.
"""
from __future__ import annotations

import numpy as np

from recstack.bundle import SNAPSHOT_ITEMS, Bundle, BundleError
from recstack.features import ItemTable

VALUE_COLUMNS = ("price", "value", "one")


def objective_of(manifest: dict) -> str:
    """The manifest's value column name (BundleError for one this server does not know)."""
    entry = manifest.get("objective", {"value_column": "price"})
    column = entry.get("value_column") if isinstance(entry, dict) else None
    if column not in VALUE_COLUMNS:
        raise BundleError(f"manifest.json: objective.value_column must be one of {', '.join(VALUE_COLUMNS)}, got {column!r}")
    return column


def read_values(bundle: Bundle, items: ItemTable) -> tuple[str, np.ndarray]:
    """-> (value column, (I,) float64 value of each item: finite, >= 0)."""
    import pyarrow.parquet as pq

    column = objective_of(bundle.manifest)
    if column == "one":
        return column, np.ones(items.n, np.float64)
    if column == "price":
        return column, np.asarray(items.price, np.float64)
    try:
        table = pq.read_table(bundle.path(SNAPSHOT_ITEMS), columns=["value"])
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types (a missing column included)
        raise BundleError(f"bundle file {SNAPSHOT_ITEMS!r}: objective.value_column is 'value' but the column cannot be "
                          f"read: {e}") from e
    values = table.column("value").to_numpy(zero_copy_only=False).astype(np.float64)
    if len(values) != items.n or not (np.all(np.isfinite(values)) and np.all(values >= 0)):
        raise BundleError(f"bundle file {SNAPSHOT_ITEMS!r}: value must be finite and >= 0 for each of the {items.n} items")
    return column, values
