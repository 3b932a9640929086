"""Benchmarks and the load tester. Each takes checkpoints or bundles as input; none trains a model."""
