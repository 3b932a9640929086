"""The pipeline: bundle assembly from trained checkpoints (export) and the quickstart that chains every step."""
