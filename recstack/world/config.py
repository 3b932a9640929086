"""The simulated world's configuration and presets.

Every field can be overridden with `--set key=value`. The comments say why each
property is in the world: it is there because the papers' setting has it, never
because it moves a result.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class WorldConfig:
    # --- sizes -------------------------------------------------------------------
    n_users: int = 5_000
    n_items: int = 20_000
    # Taobao has thousands of leaf categories and millions of shops and brands: the exact
    # per-(user, category/shop/brand) counts are what a 128-d inner product cannot represent.
    n_categories: int = 300
    n_shops: int = 3_000
    n_brands: int = 2_000
    n_days: int = 4  # train on days 1..D-1, test on day D (next-day split)
    # Days of traffic before day 1 whose impressions are not logged but whose clicks and
    # purchases are: users arrive with a behaviour history, as on a live platform.
    history_days: int = 7
    n_price_buckets: int = 10
    n_age_buckets: int = 7
    n_genders: int = 2
    n_activity_levels: int = 4
    latent_dim: int = 16  # dimension of the hidden taste / item vectors

    # --- traffic -----------------------------------------------------------------
    sessions_per_day: float = 1.5  # mean sessions per user per day, scaled by activity level
    impressions_per_session: int = 10
    # The logging policy (an older recommender) scores a pool of candidates by popularity
    # plus a noisy affinity and shows the top ones, so negatives are "weak positives" that
    # passed a previous stage, as both papers argue.
    policy_pool_popular: int = 60  # pool candidates drawn by popularity
    policy_pool_intent: int = 40  # pool candidates drawn from the user's current intent categories
    policy_popularity_weight: float = 0.3
    policy_affinity_weight: float = 1.0
    policy_noise: float = 1.0
    zipf_exponent: float = 1.0  # item popularity ~ 1 / rank^s: a long tail of rarely seen items

    # --- click model ---------------------------------------------------------------
    ctr_bias: float = -4.0
    taste_weight: float = 1.5  # long-term taste . item latent (learnable from ids and the sequence)
    quality_weight: float = 0.4
    # The privileged (interacted) signal: a per-day intent over a few categories and a
    # per-user affinity to a few shops and brands. Both are revealed by the user's recent
    # clicks in the item's category / shop / brand - the interacted features.
    privileged_strength: float = 1.0  # scales all of it; 0 = interacted features carry no extra signal
    intent_weight: float = 1.2
    shop_affinity_weight: float = 1.0
    brand_affinity_weight: float = 0.7
    intent_categories: int = 3  # categories a user is after on a given day
    favourite_shops: int = 5
    favourite_brands: int = 5
    click_noise: float = 0.5  # per-impression logit noise (part of the truth; nobody observes it)
    # How far the hidden state follows long-term taste (0: independent of it, 1: all of it).
    # On a platform a user's daily intent is mostly one of their habitual categories and
    # their favourite shops sell in the categories they like, so ids and the click sequence
    # predict part of what the interacted features reveal: that part can be distilled into a
    # student that never sees them (PFD §3), the rest stays privileged. Each intent slot is,
    # with this probability, one of the user's habitual (taste) categories instead of the
    # day's fresh draw; each favourite shop / brand is one selling in a taste category.
    intent_taste_share: float = 0.5
    favourite_taste_share: float = 0.5

    # --- the behaviour log beyond clicks ------------------------------------------------
    # PFD's interacted features count the user's behaviours on the candidate's category /
    # shop over the whole log: browsing, favourites and add-to-cart besides clicks. Before
    # each session's recommendation list a user browses (search, shop pages) a few detail
    # pages, mostly inside the day's intent and their favourite shops / brands: those views
    # are logged (the full log) but the recommender's 50-slot sequence keeps only clicks
    # and purchases. Views per session ~ Poisson(this x the activity rate), so an active user
    # leaves several per session.
    views_per_session: float = 2.0
    view_intent_share: float = 0.5  # of the views: on items of the day's intent categories
    view_favourite_share: float = 0.3  # on items of a favourite shop or brand (the rest: by popularity)
    # A viewed item is favourited / carted with probability sigmoid(logit(rate) + the
    # purchase logit's centred value): the more the user would buy it, the likelier.
    favourite_rate: float = 0.03
    cart_rate: float = 0.03

    # --- conversion model ------------------------------------------------------------
    cvr_bias: float = -3.2
    cvr_taste_weight: float = 0.8
    cvr_quality_weight: float = 0.5
    cvr_intent_weight: float = 0.8
    price_sensitivity: float = 0.6  # mean user price sensitivity (x log price)
    # Post-click (post-event) features are caused by the purchase: dwell, comments, chat,
    # cart. Dwell also grows with price, so a teacher that sees only them is misled on
    # expensive items (PFD §5.3). 0 = they carry no information about the purchase.
    post_event_strength: float = 1.0
    # What the post-event features follow: 0 = the realised purchase only (then a teacher on
    # them is nearly the label), 1 = the latent purchase propensity (the purchase logit minus
    # cvr_bias) only. In between, a mix: dwell, chat and cart reflect how much the user
    # wanted the item, bought or not, as on a real detail page.
    post_event_propensity: float = 0.5
    # How much of the price's pull on the purchase propensity (price_sensitivity x log price)
    # the post-event features follow. 1 = all of it: a dearer item is looked at as briefly as
    # the user's lower wish to buy it says, which nearly cancels the price's own push on dwell,
    # comments and chat above, so a teacher on them alone is barely misled. 0 = none: the page
    # shows how much the user likes the item, and deliberation over a dear item lengthens it,
    # while the purchase still falls with price -- PFD §4's account of LUPI's false positives
    # on expensive items, which a teacher that also reads the price (PFD) can undo.
    post_event_price_penalty: float = 1.0
    # Consent (signal loss): users without consent show every conversion as 0 in the
    # per-example stream; only daily per-category aggregates count them.
    consent_rate: float = 1.0
    # How far consent follows an observed user attribute (0: independent of everything).
    # Under App Tracking Transparency consent splits by platform, a feature every model sees,
    # so a model on the biased stream can learn "this group never converts". Here the
    # attribute is the age bucket: consent logit = logit(consent_rate) + this x the user's
    # standardised age bucket (age does not change the true conversion probability).
    consent_age_slope: float = 0.0

    def validate(self) -> None:
        for name in ("n_users", "n_items", "n_categories", "n_shops", "n_brands", "latent_dim", "impressions_per_session"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_days < 3:
            raise ValueError(f"n_days must be >= 3 (train, validation and test days), got {self.n_days}")
        if self.history_days < 0:
            raise ValueError(f"history_days must be >= 0, got {self.history_days}")
        if not 0.0 <= self.consent_rate <= 1.0:
            raise ValueError(f"consent_rate must be in [0, 1], got {self.consent_rate}")
        if self.consent_age_slope != 0.0 and not 0.0 < self.consent_rate < 1.0:
            raise ValueError("consent_age_slope needs 0 < consent_rate < 1 (the mean around which consent varies)")
        if self.policy_pool_popular + self.policy_pool_intent < self.impressions_per_session:
            raise ValueError("policy_pool_popular + policy_pool_intent must be >= impressions_per_session")
        if self.n_price_buckets < 2:
            raise ValueError("n_price_buckets must be >= 2")
        for name in ("intent_taste_share", "favourite_taste_share", "view_intent_share", "view_favourite_share",
                     "post_event_propensity", "post_event_price_penalty"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.view_intent_share + self.view_favourite_share > 1.0:
            raise ValueError("view_intent_share + view_favourite_share must be <= 1")
        if self.views_per_session < 0:
            raise ValueError(f"views_per_session must be >= 0, got {self.views_per_session}")
        for name in ("favourite_rate", "cart_rate"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.sessions_per_day <= 0:
            raise ValueError("sessions_per_day must be > 0")


PRESETS: dict[str, dict] = {
    # tests: seconds
    "tiny": dict(n_users=400, n_items=2_000, n_categories=40, n_shops=300, n_brands=200, n_days=3),
    # quickstart: trained and served in minutes
    "small": dict(n_users=5_000, n_items=20_000, n_categories=300, n_shops=3_000, n_brands=2_000, n_days=4),
    # experiment reports
    "medium": dict(n_users=30_000, n_items=100_000, n_categories=1_000, n_shops=15_000, n_brands=8_000, n_days=5),
    # the serving corpus for benchmarks: 1e6 items
    "large": dict(n_users=100_000, n_items=1_000_000, n_categories=3_000, n_shops=100_000, n_brands=50_000, n_days=3),
}


def preset(name: str) -> WorldConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = dataclasses.replace(WorldConfig(), **PRESETS[name])
    cfg.validate()
    return cfg
