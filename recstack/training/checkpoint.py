"""Checkpoints: a plain dict of tensors and JSON-able values, loaded with weights_only=True."""
from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


class CheckpointError(RuntimeError):
    pass


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically (tmp file + rename) so a crash never leaves a half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path, stage: str | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (run `recstack train` first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if stage is not None and ckpt.get("stage") != stage:
        raise CheckpointError(f"{path} is a {ckpt.get('stage')!r} checkpoint, expected {stage!r}")
    return ckpt


# ------------------------------------------------------------------ training state (resume)
#
# A training-state checkpoint (OUT/STAGE/train_state.pt) lets `--resume` continue an
# interrupted run so that it ends bit-identical (CPU, same world size) to an uninterrupted
# one. A run is a sequence of *phases*, one per training loop, in a fixed order (fine: CTR
# then CVR; coarse Ind&Async: teacher then student). The file holds the final state of every
# finished phase and a snapshot of the running one: the modules, optimiser, LR scheduler,
# step, epoch and position in the epoch's batch order, the loop's own generator, and the
# global torch / numpy / python RNG states. Everything is tensors, numbers, strings, lists
# and dicts, so it loads with weights_only=True.

STATE_FILE = "train_state.pt"
STATE_KIND = "training_state"
STATE_FORMAT = 1
# config fields that may differ between a checkpoint and the run resuming from it: they do
# not change what is trained
RESUME_IGNORED_FIELDS = frozenset({"checkpoint_every", "eval_batch_size"})


def rng_state() -> dict[str, Any]:
    """The global torch / numpy / python RNG states as tensors and lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


class Phase:
    """One training loop's view of the run: what to resume from, and `after_step` to call
    once per optimiser step.

    done: {"model": state, "stats": dict} when this phase had finished before the
    interruption (skip the loop, load the state); resume: the loop snapshot to continue
    from (None: start fresh).
    """

    def __init__(self, run: "TrainingState | None", index: int, name: str, n_rows: int,
                 done: dict | None = None, resume: dict | None = None):
        self.run, self.index, self.name, self.n_rows = run, index, name, n_rows
        self.done, self.resume = done, resume

    def after_step(self, step: int, snapshot: Callable[[], dict]) -> None:
        """Write a snapshot every `checkpoint_every` steps of this phase (`snapshot()` is only
        called then)."""
        if self.run is None:
            return
        self.run._after_step(self, step, snapshot)

    def finish(self, model_state: dict, stats: dict, extra: dict | None = None) -> None:
        """Record the phase's final state (and write it, so a kill between phases loses nothing);
        `extra` entries (e.g. an optimiser state a later phase continues from) are kept in `done`."""
        if self.run is not None:
            self.run._finish(self, model_state, stats, extra or {})


class TrainingState:
    """Periodic training-state checkpoints of one `train()` call, and resuming from one.

    Used as a context manager; the training loops reach it through `phase(name, n_rows)`
    so that the functions between `train()` and the loops keep their signatures. `write`
    is False on every rank but 0 under DDP (the ranks hold identical states).
    """

    on_step: Callable[[Phase, int], None] | None = None  # test hook: called after every step (e.g. to raise)

    def __init__(self, path: str | Path, stage: str, config: dict, every: int = 0, resume: bool = False,
                 write: bool = True):
        if every < 0:
            raise CheckpointError(f"checkpoint_every must be >= 0, got {every}")
        self.path, self.stage, self.config, self.every, self.write = Path(path), stage, config, every, write
        self.loaded = load_state(self.path, stage, config) if resume and self.path.exists() else None
        self.resumed = self.loaded is not None
        self.done: list[dict] = list(self.loaded["done"]) if self.loaded else []
        self._next = 0

    def __enter__(self) -> "TrainingState":
        global _ACTIVE
        if _ACTIVE is not None:
            raise CheckpointError("a training state is already active in this process")
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None

    def phase(self, name: str, n_rows: int) -> Phase:
        index, self._next = self._next, self._next + 1
        if index < len(self.done):
            d = self.done[index]
            _check_phase(self.path, d, name, n_rows)
            return Phase(self, index, name, n_rows, done={k: v for k, v in d.items() if k not in ("index", "name", "n_rows")})
        cur = self.loaded.get("current") if self.loaded else None
        if cur is not None and cur["index"] == index:
            _check_phase(self.path, cur, name, n_rows)
            set_rng_state(cur["rng"])
            return Phase(self, index, name, n_rows, resume=cur)
        return Phase(self, index, name, n_rows)

    def _payload(self, current: dict | None) -> dict:
        return {"kind": STATE_KIND, "format": STATE_FORMAT, "stage": self.stage, "config": self.config,
                "done": self.done, "current": current}

    def _after_step(self, ph: Phase, step: int, snapshot: Callable[[], dict]) -> None:
        if self.every and step % self.every == 0 and self.write:
            current = {"index": ph.index, "name": ph.name, "n_rows": ph.n_rows, "step": step, "rng": rng_state(),
                       **snapshot()}
            save(self.path, self._payload(current))
        if TrainingState.on_step is not None:
            TrainingState.on_step(ph, step)

    def _finish(self, ph: Phase, model_state: dict, stats: dict, extra: dict) -> None:
        if ph.index < len(self.done):
            return
        # a copy: the caller may go on changing the modules in place (e.g. a calibration shift)
        model_state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in model_state.items()}
        self.done.append({"index": ph.index, "name": ph.name, "n_rows": ph.n_rows, "model": model_state,
                          "stats": _plain(stats), **copy.deepcopy(extra)})
        if self.every and self.write:
            save(self.path, self._payload(None))


_ACTIVE: TrainingState | None = None


def phase(name: str, n_rows: int) -> Phase:
    """The active run's next phase (a do-nothing phase when no `TrainingState` is active:
    the lead's experiments and the tests that call the fit functions directly)."""
    if _ACTIVE is None:
        return Phase(None, 0, name, n_rows)
    return _ACTIVE.phase(name, n_rows)


def _plain(x: Any) -> Any:
    """Numbers / strings / lists / dicts only (numpy scalars become Python ones)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return x


def _check_phase(path: Path, saved: dict, name: str, n_rows: int) -> None:
    if saved["name"] != name:
        raise CheckpointError(f"{path}: phase {saved['index']} is {saved['name']!r} in the checkpoint but {name!r} in "
                              f"this run")
    if saved["n_rows"] != n_rows:
        raise CheckpointError(f"{path}: phase {name!r} was trained on {saved['n_rows']} rows, this run has {n_rows} "
                              f"(different --data?)")


def load_state(path: str | Path, stage: str, config: dict) -> dict[str, Any]:
    """Read a training-state checkpoint, refusing one of another stage, format or config
    (the error names the first differing config fields)."""
    ckpt = load(path, stage=stage)
    if ckpt.get("kind") != STATE_KIND or ckpt.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a training-state checkpoint of format {STATE_FORMAT} "
                              f"(kind {ckpt.get('kind')!r}, format {ckpt.get('format')!r})")
    for key in ("config", "done", "current"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: training-state checkpoint without {key!r}")
    saved = ckpt["config"]
    diff = [k for k in sorted(set(saved) | set(config)) if k not in RESUME_IGNORED_FIELDS and saved.get(k) != config.get(k)]
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {config.get(k)!r}" for k in diff)
        raise CheckpointError(f"{path}: config differs from the checkpoint's, refusing to resume ({detail})")
    return ckpt
