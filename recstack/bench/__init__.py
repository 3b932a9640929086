"""Benchmarks and the load tester, one module per role:

- timing: the machine's description, its load average, `time_ms` / `time_interleaved`, one thread;
- models: coarse and fine model costs (`recstack bench models`);
- teacher: the trained PFD+MD teacher read from a coarse run or a teacher file;
- serving_path: the retrieval point, the served cascade's stages and profile, the coarse stage as served;
- e2e: end to end through gRPC with the peers; loadtest: the open-loop load tester;
- suite: every section in one run (`recstack bench all`); report: their plots and report.md;
- index_sweep: the retrieval index sweep (`recstack bench retrieval`);
- train_cost: the coarse training cost per teacher (`recstack bench train`).

Each takes checkpoints, bundles or worlds as input and trains no model, except train_cost,
whose measurement is training itself.
"""
