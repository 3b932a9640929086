"""The documented schema of a `recstack simulate` output directory.

`SCHEMA[file][column] = description`. tests/world/test_world.py checks the files against it.
Times (`ts`) are seconds since the start of the first history day; day d >= 1 spans
[(history_days + d - 1) * 86400, (history_days + d) * 86400). Ids are 0-based.

A day's impressions are in one of two layouts (the same rows either way, in the same order):
`impressions/day=NN.parquet` (the default), or, from `simulate(..., shard_rows=N)`,
`impressions/day=NN/part-PPPPP.parquet` shards of N rows each (the day's last one fewer),
with every shard's row count listed in world.json's `impression_shards`. The shards of a
day, read in part order and concatenated, are the one-file layout's day.
"""

# file names, relative to the data directory (str.format with day=, part=)
DAY_FILE = "impressions/day={day:02d}.parquet"
SHARD_DIR = "impressions/day={day:02d}"
SHARD_FILE = "impressions/day={day:02d}/part-{part:05d}.parquet"

SCHEMA: dict[str, dict[str, str]] = {
    "users.parquet": {
        "user_id": "int64, 0..n_users-1",
        "age_bucket": "int64, 0..n_age_buckets-1 (regular feature)",
        "gender": "int64, 0..n_genders-1 (regular feature)",
        "activity": "int64, 0..n_activity_levels-1: how often the user visits (regular feature)",
        "consent": "bool: the user consents to conversion tracking (signal loss when false)",
    },
    "items.parquet": {
        "item_id": "int64, 0..n_items-1",
        "category": "int64, 0..n_categories-1 (leaf category)",
        "shop": "int64, 0..n_shops-1; shops mostly sell within one home category",
        "brand": "int64, 0..n_brands-1",
        "price": "float32, > 0",
        "price_bucket": "int64, 0..n_price_buckets-1 (quantiles of log price)",
    },
    "events.parquet": {
        "user_id": "int64",
        "ts": "float64 seconds; sorted by (user_id, ts)",
        "item_id": "int64",
        "kind": "int8, the index into recstack.features.EVENT_KINDS: 0 = click (on a logged impression), "
                "1 = purchase (follows its click by the dwell time), 2 = view (a detail page browsed in the half "
                "hour before a session's list, not a logged impression), 3 = favourite, 4 = cart (during a view's "
                "dwell, or halfway through a clicked impression's dwell when its `cart` is 1)",
        "dwell": "float32 seconds on the detail page (clicks and views; 0 for purchases, favourites and carts)",
    },
    "impressions/day=NN.parquet": {
        "day": "int16, 1..n_days",
        "ts": "float64 seconds: when the session's list was shown",
        "user_id": "int64",
        "session_id": "int64, unique per session",
        "position": "int64, 0-based slot in the session's list (the logging policy's order)",
        "item_id": "int64",
        "click": "bool label",
        "purchase": "bool label: purchase given the impression (true, consent ignored)",
        "purchase_observed": "bool: purchase as the per-example stream sees it (0 without consent)",
        "dwell": "float32 post-event (CVR privileged): seconds on the detail page, 0 when not clicked; it, comments, "
                 "chatted and cart follow a mix (post_event_propensity) of the realised purchase and the latent "
                 "purchase propensity (with as much of the price's pull on it as post_event_price_penalty keeps)",
        "comments": "int16 post-event: comments viewed, 0 when not clicked",
        "chatted": "int16 post-event: 0/1 chatted with the seller",
        "cart": "int16 post-event: 0/1 added to cart",
        "true_pctr": "float32 ground truth P(click) of this impression",
        "true_pcvr": "float32 ground truth P(purchase | click) of this impression",
    },
    "aggregates.parquet": {
        "day": "int16",
        "category": "int64",
        "clicks": "int64 clicks on the category that day",
        "conversions": "int64 purchases after those clicks, all users (the aggregated counts)",
        "conversions_observed": "int64 the same, consented users only",
    },
    "truth_users.parquet": {
        "user_id": "int64",
        "price_sensitivity": "float64 (hidden)",
        "favourite_shops": "list<int64> (hidden): shops the user has an affinity to",
        "favourite_brands": "list<int64> (hidden)",
        "habit_categories": "list<int64> (hidden): the categories the user's long-term taste was built from; "
                            "a share (intent_taste_share) of each day's intents is drawn from them",
        "taste": "list<float32> latent taste vector (hidden)",
    },
    "truth_items.parquet": {
        "item_id": "int64",
        "quality": "float64 (hidden)",
        "popularity": "float64: the logging policy's sampling probability (hidden)",
        "latent": "list<float32> latent vector (hidden)",
    },
    "truth_intents.parquet": {
        "user_id": "int64",
        "day": "int16",
        "category": "int64: one of the user's intent categories that day (hidden)",
    },
    "truth_categories.parquet": {
        "category": "int64",
        "popularity": "float64 (hidden)",
    },
}

WORLD_JSON = {
    "format_version": "int: layout version of this directory",
    "preset": "str or null",
    "seed": "int",
    "config": "the WorldConfig used, every field",
    "n_days": "int",
    "history_days": "int: unlogged days of behaviour before day 1",
    "day_seconds": "86400",
    "now": "float: end of the logs in ts units (the serving snapshot's clock)",
    "vocab": "cardinalities + log-price standardisation (recstack.features.Vocab)",
    "days": "per-day impressions, CTR, CVR, observed CVR",
    "n_events": "int",
    "impression_shards": "only in the sharded layout: {shard_rows: int, rows: {day (str): [rows of part 0, 1, ...]}}",
    "timings_s": "simulation wall time",
}
