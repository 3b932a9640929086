"""The data contract has one source of truth (recstack.data.contract): docs/DATA.md holds its
tables exactly, the simulator writes the columns it names, and the loader fills what is optional."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recstack.data import contract as K
from recstack.world.schema import SCHEMA

DATA_MD = (Path(__file__).resolve().parents[2] / "docs" / "DATA.md").read_text()


@pytest.mark.parametrize("table", K.TABLES, ids=lambda t: t.file)
def test_data_md_holds_each_table_as_the_code_defines_it(table):
    assert f"### {table.file}\n\n{K.markdown_table(table)}\n" in DATA_MD


def test_data_md_holds_world_json_and_the_event_kinds():
    assert K.world_markdown() in DATA_MD
    assert ", ".join(f"{i} = {k}" for i, k in enumerate(K.EVENT_KINDS)) in DATA_MD
    assert K.EVENT_KINDS == ("click", "purchase", "view", "favourite", "cart")


@pytest.mark.parametrize("table", K.TABLES, ids=lambda t: t.file)
def test_the_simulator_writes_the_contract(table):
    """Every column the simulator writes is in the contract, with its required ones; the
    contract adds only columns a team's own data may have (external ids, an item value)."""
    simulated = set(SCHEMA[table.file])
    names = {c.name for c in table.columns}
    assert simulated <= names and set(table.required_columns) <= simulated
    assert names - simulated <= {"external_id", "value"}


def test_a_simulated_world_matches_the_declared_kinds(tiny_data):
    from recstack.data.validate import _kind_ok

    for table in (K.USERS, K.ITEMS, K.EVENTS, K.IMPRESSIONS, K.AGGREGATES):
        rel = table.file if table is not K.IMPRESSIONS else "impressions/day=01.parquet"
        schema = pq.read_schema(Path(tiny_data) / rel)
        for c in table.columns:
            if c.name in schema.names:
                assert _kind_ok(c.kind, schema.field(c.name).type), (rel, c.name, schema.field(c.name).type)


def test_fill_defaults():
    cols = K.fill_defaults(K.IMPRESSIONS, {"click": np.array([True, False]), "purchase": np.array([True, False])}, 2)
    assert cols["purchase_observed"].tolist() == [True, False] and cols["position"].tolist() == [0, 0]
    assert np.isnan(cols["true_pctr"]).all() and cols["dwell"].dtype == np.float32
    users = K.fill_defaults(K.USERS, {"user_id": np.arange(3)}, 3)
    assert users["consent"].tolist() == [True] * 3 and "external_id" not in users
    assert K.fill_defaults(K.ITEMS, {}, 2)["price"].tolist() == [1.0, 1.0]
