"""Retrieval stage: a two-tower model (sampled softmax + logQ correction) and its FAISS index.

model.py         TwoTower = UserTower + ItemTower (pure modules)
train.py         Config, train(cfg, data_dir, out_dir) -> metrics (recall@K vs popularity)
export.py        export(checkpoint, out_dir): user_tower.onnx, item_emb.npy, index.faiss
index.py         build(emb, factory), default_spec(n_items) (index by corpus size), ShardedIndex
bench.py         run(out_dir, checkpoint): recall@1000 vs exact / latency / build / memory per index
cascade_eval.py  run(bundle_or_runs, data_dir, out_dir): oracle top-50 kept per stage, GMV@50 share
"""
