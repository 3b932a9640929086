"""The simulated world (DESIGN §4): `simulate(cfg, seed, out)` writes Parquet logs with ground truth."""
from recstack.world.config import PRESETS, WorldConfig, preset
from recstack.world.simulate import simulate

__all__ = ["PRESETS", "WorldConfig", "preset", "simulate"]
