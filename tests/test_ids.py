"""External ids (recstack.ids): checked mappings, lookups both ways, canonical integer keys."""
from __future__ import annotations

import numpy as np
import pytest

from recstack import ids as IDS


def test_string_ids_map_both_ways_and_unknown_is_minus_one():
    m = IDS.IdMap(np.array(["u-a", "u-b", "u-c"], dtype=object), 3)
    assert m.kind == IDS.KIND_STRING
    assert m.internal_of_keys(["u-c", "nope", "u-a"]).tolist() == [2, -1, 0]
    assert m.keys(np.array([1, 2])) == ["u-b", "u-c"]
    # with string ids the int64 fields carry internal indices
    assert m.internal_of_ints([1, 3, -1]).tolist() == [1, -1, -1]
    assert m.ints(np.array([2])).tolist() == [2]


def test_int_ids_map_both_ways_including_negative_and_huge_ids():
    ext = np.array([10**15, -7, 42, 0], dtype=np.int64)
    m = IDS.IdMap(ext, 4)
    assert m.kind == IDS.KIND_INT
    assert m.internal_of_ints([42, -7, 10**15, 1, 0]).tolist() == [2, 1, 0, -1, 3]
    assert m.ints(np.array([0, 2])).tolist() == [10**15, 42]
    assert m.keys(np.array([1, 3])) == ["-7", "0"]
    # keys are the canonical decimal form: "042" and " 42" name no item
    assert m.internal_of_keys(["42", "042", " 42", "+42", "-7", "x"]).tolist() == [2, -1, -1, -1, 1, -1]


def test_identity_keeps_indices_in_range():
    m = IDS.IdMap.identity(5)
    assert m.internal_of_ints([0, 4, 5, -1]).tolist() == [0, 4, -1, -1]
    assert m.internal_of_keys(["3", "5", "03"]).tolist() == [3, -1, -1]
    assert m.keys(np.array([4])) == ["4"]


@pytest.mark.parametrize("values,n,needle", [
    (np.array(["a", "b", "a"], dtype=object), 3, "'a' names 2 rows"),
    (np.array([5, 6, 5]), 3, "5 names 2 rows"),
    (np.array(["a", None], dtype=object), 2, "nulls or mixed types"),
    (np.array(["a", ""], dtype=object), 2, "empty string"),
    (np.array([1.0, 2.0]), 2, "int64 or string, got float64"),
    (np.array([1, 2]), 3, "2 external ids for 3 rows"),
])
def test_a_bad_mapping_is_refused_naming_where_and_why(values, n, needle):
    with pytest.raises(IDS.IdError, match="^users.parquet: ") as e:
        IDS.check_external(values, n, "users.parquet")
    assert needle in str(e.value)


def test_written_ids_read_back_unchanged(tmp_path):
    for ext in (np.array(["x", "y"], dtype=object), np.array([7, 3], dtype=np.int64)):
        IDS.write_external(tmp_path / "ids.parquet", ext)
        back = IDS.read_external(tmp_path / "ids.parquet")
        assert back.tolist() == ext.tolist()
