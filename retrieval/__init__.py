"""Retrieval stage: a two-tower model (sampled softmax + logQ correction) and its FAISS index.

config.py        Config: every `--set` key (positives, logQ strength, split, index, ...)
model.py         TwoTower = UserTower + ItemTower (pure modules)
positives.py     the training positives: clicked impressions, or behaviour-log events at their session's start
tasks.py         sampled softmax with logQ correction, the training step
train.py         train(cfg, data_dir, out_dir) -> metrics (recall@K vs popularity)
export.py        export(checkpoint, out_dir): user_tower.onnx, item_emb.npy, index.faiss
index.py         build(emb, factory), default_spec(n_items) (index by corpus size), ShardedIndex
evaluation.py    recall of a checkpoint against clicks, the oracle top 50 and the truth ceilings
sweep.py         one model per setting and seed, metrics to a JSON-lines file (ablations, contrasts)
(the index sweep over recall / latency: recstack/bench/index_sweep.py; the cascade's oracle
recall per stage: recstack/evaluation/cascade.py)
"""
