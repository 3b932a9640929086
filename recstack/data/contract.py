"""The data contract: the tables a data folder holds, every column's type, meaning and
whether it is required. docs/DATA.md is written from this module (tests/data/test_contract.py
checks that the two agree); the loader fills optional columns with their defaults and the
validator (recstack.data.validate) checks a folder against it.

A column's `kind` is one of: "int" (any Parquet integer), "float" (float or integer),
"bool" (boolean or 0/1 integer), "id" (int64 or string: a team's own external id).
`default` is what the loader uses when an optional column is absent: a number, or
"=COLUMN" (a copy of another column of the same table), or None (a NaN column for floats).
"""
from __future__ import annotations

from dataclasses import dataclass

# behaviour kinds in events.parquet `kind` (the index is the stored value)
EVENT_KINDS = ("click", "purchase", "view", "favourite", "cart")
KIND_ID = {name: i for i, name in enumerate(EVENT_KINDS)}

# truth columns: the simulator's ground truth; a real log has none (the truth-based metrics are skipped)
TRUTH_COLUMNS = ("true_pctr", "true_pcvr")


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "int" | "float" | "bool" | "id"
    required: bool
    meaning: str
    default: float | int | bool | str | None = 0


@dataclass(frozen=True)
class Table:
    file: str  # relative to the data folder; impressions: one file per day (or per shard)
    required: bool
    meaning: str
    columns: tuple[Column, ...]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)


C = Column
USERS = Table("users.parquet", True, "one row per user, user_id 0..n_users-1 in order", (
    C("user_id", "int", True, "dense internal id, 0..n_users-1, row i has user_id i"),
    C("age_bucket", "int", False, "user feature, 0..n_age_buckets-1"),
    C("gender", "int", False, "user feature, 0..n_genders-1"),
    C("activity", "int", False, "user feature, 0..n_activity_levels-1 (how often the user visits)"),
    C("consent", "bool", False, "the user consents to conversion tracking (signal-loss experiments)", True),
    C("external_id", "id", False, "the team's own id for this user (int64 or string; unique)", None),
))
ITEMS = Table("items.parquet", True, "one row per item, item_id 0..n_items-1 in order", (
    C("item_id", "int", True, "dense internal id, 0..n_items-1, row i has item_id i"),
    C("category", "int", True, "leaf category, 0..n_categories-1"),
    C("shop", "int", False, "shop (seller), 0..n_shops-1"),
    C("brand", "int", False, "brand, 0..n_brands-1"),
    C("price", "float", False, "price, > 0; the objective's default value column", 1.0),
    C("price_bucket", "int", False, "price bucket, 0..n_price_buckets-1 (quantiles of log price)"),
    C("value", "float", False, "what a purchase is worth to the team (margin, ...), >= 0; "
                               "an objective value column chosen at export", None),
    C("external_id", "id", False, "the team's own id for this item (int64 or string; unique)", None),
))
EVENTS = Table("events.parquet", True, "the behaviour log: the users' sequences (model inputs)", (
    C("user_id", "int", True, "0..n_users-1"),
    C("ts", "float", True, "seconds >= 0 on the impressions' clock; rows in any order"),
    C("item_id", "int", True, "0..n_items-1"),
    C("kind", "int", True, "behaviour: " + ", ".join(f"{i} = {k}" for i, k in enumerate(EVENT_KINDS))),
    C("dwell", "float", False, "seconds on the detail page (0 when unknown)"),
))
IMPRESSIONS = Table("impressions/day=NN.parquet", True,
                    "what was shown and what happened, one file per day NN = 01..n_days", (
    C("day", "int", True, "1..n_days, the file's day"),
    C("ts", "float", True, "seconds: when the list was shown; non-decreasing within a session"),
    C("user_id", "int", True, "0..n_users-1"),
    C("session_id", "int", True, "one id per request (the list shown together)"),
    C("position", "int", False, "0-based slot in the list"),
    C("item_id", "int", True, "0..n_items-1"),
    C("click", "bool", True, "label: the impression was clicked"),
    C("purchase", "bool", True, "label: purchase after the click (0 when not clicked)"),
    C("purchase_observed", "bool", False, "purchase as a consent-limited stream sees it", "=purchase"),
    C("dwell", "float", False, "post-event (CVR teacher only): seconds on the detail page, 0 when not clicked"),
    C("comments", "int", False, "post-event: comments viewed"),
    C("chatted", "int", False, "post-event: 0/1 chatted with the seller"),
    C("cart", "int", False, "post-event: 0/1 added to cart"),
    C("true_pctr", "float", False, "simulator truth: P(click); absent in a real log", None),
    C("true_pcvr", "float", False, "simulator truth: P(purchase | click); absent in a real log", None),
))
AGGREGATES = Table("aggregates.parquet", False,
                   "daily per-category conversion counts (consent-free aggregates); only cvr_calibrate=aggregates "
                   "and the signal-loss experiment need it", (
    C("day", "int", True, "1..n_days"),
    C("category", "int", True, "0..n_categories-1"),
    C("clicks", "int", True, "clicks on the category that day"),
    C("conversions", "int", True, "purchases after those clicks, all users"),
    C("conversions_observed", "int", False, "the same, consented users only"),
))
del C

TABLES: tuple[Table, ...] = (USERS, ITEMS, EVENTS, IMPRESSIONS, AGGREGATES)
BY_FILE = {t.file: t for t in TABLES}

# the simulator's hidden truth files: optional, used by the experiments only
TRUTH_FILES = ("truth_users.parquet", "truth_items.parquet", "truth_intents.parquet", "truth_categories.parquet")

# world.json: the folder's metadata. Required keys; the importers write them.
WORLD_REQUIRED = {
    "n_days": "int >= 1: impression days 1..n_days (the last is the test day, the one before the validation day)",
    "vocab": "cardinalities (n_users, n_items, n_categories, n_shops, n_brands, n_price_buckets, n_age_buckets, "
             "n_genders, n_activity_levels) and log_price_mean / log_price_std",
}
WORLD_OPTIONAL = {
    "now": "float: end of the logs in ts units (the serving snapshot's clock); default the end of day n_days",
    "history_days": "int: days of behaviour before day 1 (default 0)",
    "day_seconds": "int: seconds per day (default 86400)",
    "source": "where the data came from (the importers write it)",
    "objective_value": "price, value or one: the default `recstack export --value-column` (the importers write one)",
}
VOCAB_FIELDS = ("n_users", "n_items", "n_categories", "n_shops", "n_brands", "n_price_buckets", "n_age_buckets",
                "n_genders", "n_activity_levels", "log_price_mean", "log_price_std")
# which table column each vocabulary count bounds (ids are 0..count-1)
VOCAB_COLUMNS = {
    ("users.parquet", "user_id"): "n_users", ("users.parquet", "age_bucket"): "n_age_buckets",
    ("users.parquet", "gender"): "n_genders", ("users.parquet", "activity"): "n_activity_levels",
    ("items.parquet", "item_id"): "n_items", ("items.parquet", "category"): "n_categories",
    ("items.parquet", "shop"): "n_shops", ("items.parquet", "brand"): "n_brands",
    ("items.parquet", "price_bucket"): "n_price_buckets",
}


def default_sources(table: Table, names) -> list[str]:
    """The columns whose values the defaults of `names` copy (a default "=purchase" reads purchase)."""
    by_name = {c.name: c for c in table.columns}
    return [by_name[n].default[1:] for n in names
            if n in by_name and isinstance(by_name[n].default, str) and by_name[n].default.startswith("=")]


def fill_defaults(table: Table, cols: dict, n: int, only=None) -> dict:
    """`cols` (name -> numpy array of n rows) with every absent optional column of `table` (of
    `only`, when given) filled with its default. The caller has checked the required columns
    are there, and read the columns a copied default needs (`default_sources`)."""
    import numpy as np

    out = dict(cols)
    for c in table.columns:
        if c.name in out or c.required or c.kind == "id" or (only is not None and c.name not in only):
            continue
        if isinstance(c.default, str) and c.default.startswith("="):
            out[c.name] = np.asarray(out[c.default[1:]]).copy()
        elif c.default is None:
            out[c.name] = np.full(n, np.nan, np.float32)
        elif c.kind == "bool":
            out[c.name] = np.full(n, bool(c.default))
        elif c.kind == "float":
            out[c.name] = np.full(n, float(c.default), np.float32)
        else:
            out[c.name] = np.full(n, int(c.default), np.int64)
    return out


def markdown_table(table: Table) -> str:
    """The table's columns as the Markdown table docs/DATA.md holds."""
    rows = ["| column | type | required | meaning |", "|---|---|---|---|"]
    for c in table.columns:
        rows.append(f"| `{c.name}` | {c.kind} | {'yes' if c.required else 'no'} | {c.meaning} |")
    return "\n".join(rows)


def world_markdown() -> str:
    """world.json's keys as the Markdown table docs/DATA.md holds."""
    rows = ["| key | required | meaning |", "|---|---|---|"]
    for required, keys in (("yes", WORLD_REQUIRED), ("no", WORLD_OPTIONAL)):
        rows += [f"| `{k}` | {required} | {v} |" for k, v in keys.items()]
    return "\n".join(rows)
