"""Retrieval stage: a two-tower model (sampled softmax + logQ correction) and its FAISS index.

model.py  TwoTower = UserTower + ItemTower (pure modules)
train.py  Config, train(cfg, data_dir, out_dir) -> metrics (recall@K vs popularity)
export.py export(checkpoint, out_dir): user_tower.onnx, item_emb.npy, index.faiss; build_index
"""
