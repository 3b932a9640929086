"""recstack: a cascaded recommender (retrieval -> coarse -> fine) trained and served end to end."""

__version__ = "0.1.0"
