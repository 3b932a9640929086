"""Coarse ranker: the inner-product student of PFD (Eq. 3), its training and its export
(user tower to ONNX, item vectors precomputed for the whole corpus)."""
