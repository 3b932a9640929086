"""Evaluation: metrics, the experiment protocol and reports, and the cascade measured against the simulator's truth."""
