"""Data: the loader of a simulated (or imported) world's folder and its model-input batches
(`loader`), and the Parquet shards streamed a chunk at a time for worlds beyond memory (`shards`).

The loader's public names are re-exported here, so `from recstack.data import load` is the
usual entry point."""
from recstack.data.loader import (
    IMPRESSION_COLUMNS,
    DataError,
    Examples,
    Shard,
    SimData,
    load,
    materialise,
    read_shard,
    to_torch,
)

__all__ = ["IMPRESSION_COLUMNS", "DataError", "Examples", "Shard", "SimData", "load", "materialise", "read_shard",
           "to_torch"]
