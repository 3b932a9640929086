"""The fine stage's models as served: pCTR and pCVR of a request's candidates.

A bundle ships either one graph computing both (`fine/ranker.onnx`, outputs "pctr" and
"pcvr": one session call, the shared inputs fed once; a graph that reads the behaviour
sequence also declares seq_items / seq_extras, fed as one (1, L, ...) row per request; a graph
whose meta says `user_rows: "one"` takes the request's user_feats as one (1, 4) row too), optionally with its int8 copy
(`fine/ranker_int8.onnx`, written by the exporter only once it passed the quality checks:
test-day AUC, calibration and the served top-50, see recstack/pipeline/fine_check.py), or the
older layout of two graphs (`fine/ctr.onnx`, `fine/cvr.onnx`, one output each).

    fine = FineScorer.load(bundle, allowed_inputs, threads)          # int8 when shipped
    pctr, pcvr = fine(feeds, check)                                  # (M,) float64 each
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from recstack import features as F
from recstack import item_stats as S
from recstack.bundle import Bundle, BundleError
from recstack.bundle_files import FINE_CTR, FINE_CVR, FINE_ITEM_STATS, FINE_RANKER, FINE_RANKER_INT8
from recstack.serving.loading import OnnxModel

OUTPUTS = ("pctr", "pcvr")  # the merged graph's outputs
PRECISIONS = ("int8", "fp32")
# the sequence inputs' trailing shape, as the server builds them (recstack.features.fine_inputs)
SEQUENCE_SHAPES = {"seq_items": [F.SEQ_LEN, len(F.ITEM_FIELDS)], "seq_extras": [F.SEQ_LEN, len(F.SEQ_EXTRA_FIELDS)]}


def check_sequence_inputs(model: OnnxModel, meta: dict) -> None:
    """Refuse a fine graph whose sequence inputs this server cannot feed, or whose inputs are
    not those its stage's manifest entry lists (a graph from another export)."""
    for i in model.session.get_inputs():
        want = SEQUENCE_SHAPES.get(i.name)
        if want is not None and list(i.shape[1:]) != want:
            raise BundleError(f"bundle file {model.relpath!r}: input {i.name} has shape {i.shape}, this server feeds "
                              f"[1, {', '.join(map(str, want))}]")
    listed = meta.get("inputs")
    if listed is not None and sorted(listed) != sorted(model.inputs):
        raise BundleError(f"bundle file {model.relpath!r}: inputs {model.inputs}, the manifest's fine stage lists {listed}")


def read_item_stats(bundle: Bundle, n_items: int) -> np.ndarray | None:
    """The item statistics table the rankers read (recstack.item_stats), (I, S) float32, or None
    for a bundle whose rankers read none. Refuses a manifest that names the table without the
    file (or the file without the meta), other fields than this server's, or a table of the
    wrong shape or with negative / non-finite values."""
    meta = bundle.manifest.get("stages", {}).get("fine", {}).get("meta", {}).get("item_stats")
    listed = FINE_ITEM_STATS in bundle.manifest.get("files", {})
    if meta is None and not listed:
        return None
    if meta is None or not listed:
        raise BundleError(f"bundle: {FINE_ITEM_STATS!r} and stages.fine.meta.item_stats come together; "
                          f"found only the {'file' if listed else 'meta'}")
    if list(meta.get("fields", [])) != list(S.FIELDS):
        raise BundleError(f"manifest.json: stages.fine.meta.item_stats.fields {meta.get('fields')!r}, this server "
                          f"serves {len(S.FIELDS)} fields ({', '.join(S.FIELDS[:2])}, ...)")
    try:
        table = np.load(bundle.path(FINE_ITEM_STATS), allow_pickle=False)
    except ValueError as e:
        raise BundleError(f"bundle file {FINE_ITEM_STATS!r}: {e}") from e
    why = S.check_table(table, n_items)
    if why is not None:
        raise BundleError(f"bundle file {FINE_ITEM_STATS!r}: {why}")
    return table


def check_item_dense(models: list[OnnxModel], width: int) -> None:
    """Refuse a fine graph whose item_dense width is not the one the server builds (the price,
    then the item statistics when the bundle ships them)."""
    for m in models:
        for i in m.session.get_inputs():
            if i.name == "item_dense" and isinstance(i.shape[-1], int) and i.shape[-1] != width:
                raise BundleError(f"bundle file {m.relpath!r}: item_dense has {i.shape[-1]} columns, the bundle's "
                                  f"item table and item statistics give {width}")


class FineScorer:
    """pCTR and pCVR from one merged graph (one run) or from two graphs (two runs)."""

    def __init__(self, models: list[OnnxModel], precision: str, user_once: bool = False):
        self.models = models
        self.precision = precision
        # the graph takes the request's user as one row and broadcasts it (fine_rank.serving_graph)
        self.user_once = user_once
        self.merged = len(models) == 1
        # the file each probability comes from, for error messages
        self.files = {"pctr": models[0].relpath, "pcvr": models[-1].relpath}
        if self.merged:
            outs = [o.name for o in models[0].session.get_outputs()]
            if [o for o in OUTPUTS if o not in outs]:
                raise BundleError(f"bundle file {models[0].relpath!r}: outputs {outs}, expected {list(OUTPUTS)}")
            self._outputs = list(OUTPUTS)

    @classmethod
    def load(cls, bundle: Bundle, allowed: set[str], threads: int, precision: str | None = None) -> "FineScorer":
        """The merged graph (its int8 copy when the bundle lists one, unless precision="fp32"),
        else the two-graph layout; precision="int8" requires the int8 copy."""
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
        files = bundle.manifest.get("files", {})
        meta = bundle.manifest.get("stages", {}).get("fine", {}).get("meta", {})
        if precision == "int8" and FINE_RANKER_INT8 not in files:
            raise BundleError(f"bundle has no {FINE_RANKER_INT8!r}; cannot serve the int8 fine ranker")
        if FINE_RANKER_INT8 in files and precision != "fp32":
            models = [OnnxModel(bundle, FINE_RANKER_INT8, allowed, threads)]
        elif FINE_RANKER in files:
            models = [OnnxModel(bundle, FINE_RANKER, allowed, threads)]
        else:  # the older two-graph layout: no sequence inputs, no input list in its meta
            models = [OnnxModel(bundle, FINE_CTR, allowed, threads), OnnxModel(bundle, FINE_CVR, allowed, threads)]
        for m in models:
            check_sequence_inputs(m, meta if len(models) == 1 else {})
        user_once = len(models) == 1 and meta.get("user_rows") == "one"
        return cls(models, "int8" if models[0].relpath == FINE_RANKER_INT8 else "fp32", user_once)

    def __call__(self, feeds: dict[str, np.ndarray], check: Callable[[str], None] = lambda stage: None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """feeds: one request's fine inputs, (M, ...) each (recstack.features.fine_inputs) -> pctr
        (M,), pcvr (M,) float64; `check("fine pCVR")` runs between the two runs of the two-graph layout."""
        if self.merged:
            model = self.models[0]
            if self.user_once:  # the rows repeat one user: the graph multiplies its block once
                feeds = {**feeds, "user_feats": feeds["user_feats"][:1]}
            pctr, pcvr = model.session.run(self._outputs, {n: feeds[n] for n in model.inputs})
            return pctr.reshape(-1).astype(np.float64), pcvr.reshape(-1).astype(np.float64)
        pctr = self.models[0](feeds).reshape(-1).astype(np.float64)  # (M,)
        check("fine pCVR")
        pcvr = self.models[1](feeds).reshape(-1).astype(np.float64)
        return pctr, pcvr
