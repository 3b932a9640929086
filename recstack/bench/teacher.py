"""The trained PFD+MD teacher that `bench all` times against the inner product and serves as
the teacher-as-coarse peer. A benchmark does not train it: it is read from

- a coarse run trained with the teacher and a training state, whose `train_state.pt` holds
  the last phase's student and teacher weights (`checkpoint.pt` beside it: the student, the
  config, the vocabulary and the metrics)::

      recstack train coarse --data DATA_DIR --out TEACHER_RUNS --set teacher=pfd_md \\
          --set max_steps=600 --set eval_max_rows=20000 --checkpoint-every 600
      recstack bench all --teacher TEACHER_RUNS/coarse ...

  (`TEACHER_RUNS`, `TEACHER_RUNS/coarse` or its `train_state.pt` are all accepted); or
- a teacher file: one torch dict with `config`, `vocab`, `student` and `teacher` state dicts
  and optional `metrics`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recstack import features as FE
from recstack.bench.models import request_inputs

TRAIN_HINT = ("train one with `recstack train coarse --data DATA_DIR --out TEACHER_RUNS --set teacher=pfd_md "
              "--checkpoint-every N` and pass --teacher TEACHER_RUNS/coarse")


def _read(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is refused with its reason
        raise ValueError(f"teacher file {path}: cannot read it: {e}") from e


def _run_dir(path: Path) -> Path | None:
    """The coarse run folder `path` names: itself, or its coarse/ (a runs folder)."""
    for d in (path, path / "coarse"):
        if d.is_dir() and (d / "checkpoint.pt").exists():
            return d
    return None


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _from_run(run: Path) -> dict:
    """config, vocab, student, teacher, metrics of a coarse run trained with a training state."""
    from recstack.training import checkpoint

    state_path = run / checkpoint.STATE_FILE
    if not state_path.exists():
        raise ValueError(f"teacher {run}: no {checkpoint.STATE_FILE} beside checkpoint.pt (the coarse checkpoint "
                         f"holds the student only); {TRAIN_HINT}")
    try:
        ckpt = checkpoint.load(run / "checkpoint.pt", stage="coarse")
        state = checkpoint.load(state_path, stage="coarse")
    except checkpoint.CheckpointError as e:
        raise ValueError(f"teacher {run}: {e}") from e
    if state.get("kind") != checkpoint.STATE_KIND or not state.get("done") or state.get("current") is not None:
        raise ValueError(f"teacher {state_path}: not the training state of a finished run")
    if state["config"] != ckpt["config"]:
        raise ValueError(f"teacher {run}: {checkpoint.STATE_FILE} and checkpoint.pt are not of the same run")
    model = state["done"][-1]["model"]
    student, teacher = _prefixed(model, "student."), _prefixed(model, "teacher.")
    if not teacher:
        raise ValueError(f"teacher {run}: trained without a teacher (teacher {ckpt['config'].get('teacher')!r}); "
                         f"{TRAIN_HINT}")
    if student.keys() != ckpt["model"].keys() or any(not torch.equal(v, ckpt["model"][k]) for k, v in student.items()):
        raise ValueError(f"teacher {run}: the student in {checkpoint.STATE_FILE} is not the one in checkpoint.pt")
    return {"config": ckpt["config"], "vocab": ckpt["vocab"], "student": student, "teacher": teacher,
            "metrics": ckpt.get("metrics", {})}


def check_exists(path: str | Path) -> None:
    """Refuse a teacher path that does not exist, saying how to make one."""
    if not Path(path).exists():
        raise ValueError(f"teacher {path}: no such file or folder; {TRAIN_HINT}")


def _parts(path: Path) -> dict:
    check_exists(path)
    run = _run_dir(path)
    if run is not None:
        return _from_run(run)
    if path.is_dir():
        raise ValueError(f"teacher {path}: neither a coarse run (checkpoint.pt) nor a runs folder with coarse/")
    ckpt = _read(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"teacher file {path}: not a dict of state dicts")
    if ckpt.get("kind") == "training_state":
        return _from_run(path.parent)
    missing = [k for k in ("config", "vocab", "student", "teacher") if k not in ckpt]
    if missing:
        raise ValueError(f"teacher file {path}: missing {missing}")
    return ckpt


def load_teacher(path: str | Path, data_dir: str | Path) -> tuple[torch.nn.Module, FE.Vocab, dict]:
    """The PFD+MD teacher (eval mode) of `path` (a coarse run or a teacher file, see above).
    Refuses one whose vocabulary is not `data_dir`'s. -> (teacher, vocab, info)."""
    from coarse_rank.config import checkpoint_config
    from coarse_rank.train import build_student, build_teacher

    path = Path(path)
    world_vocab = FE.Vocab.from_dict(json.loads((Path(data_dir) / "world.json").read_text())["vocab"])
    ckpt = _parts(path)
    vocab = FE.Vocab.from_dict(ckpt["vocab"])
    if vocab != world_vocab:
        raise ValueError(f"teacher {path}: its vocabulary is not the one of {data_dir}")
    cfg = checkpoint_config(ckpt["config"])
    if cfg.teacher != "pfd_md":
        raise ValueError(f"teacher {path}: teacher {cfg.teacher!r}, expected 'pfd_md'")
    student = build_student(cfg, vocab)
    student.load_state_dict(ckpt["student"])
    teacher = build_teacher(cfg, vocab, student)
    teacher.load_state_dict(ckpt["teacher"])
    metrics = ckpt.get("metrics", {})
    return teacher.eval(), vocab, {"path": str(path), "metrics": metrics, "max_steps": cfg.max_steps,
                                   "hidden": list(cfg.teacher_hidden), "manner": cfg.manner}


def stats_path(onnx_path: str | Path) -> Path:
    """Where the item statistics a teacher reads are written beside its ONNX file."""
    return Path(onnx_path).with_suffix(".item_stats.npy")


def export_teacher_onnx(teacher: torch.nn.Module, vocab: FE.Vocab, path: str | Path, seed: int = 0,
                        data_dir: str | Path | None = None) -> dict:
    """The teacher as a one-request coarse scorer in ONNX (coarse_rank.export.export_teacher),
    checked against PyTorch on a random request of 64 candidates. A teacher that reads the item
    statistics gets `data_dir`'s test-day table beside the file (`stats_path`)."""
    from coarse_rank.export import export_teacher

    width = getattr(teacher, "n_item_dense", 1)
    out = export_teacher(teacher, request_inputs(np.random.default_rng(seed), vocab, 64, width), path)
    if width > 1:
        if data_dir is None:
            raise ValueError("a teacher that reads the item statistics needs data_dir for their table")
        from recstack.data import load

        data = load(data_dir)
        np.save(stats_path(path), data.item_stats.table(data.test_day))
    return out


def teacher_onnx_fn(onnx_path: str | Path, vocab: FE.Vocab, n: int, seed: int = 0) -> Callable[[], object]:
    """-> a call of the exported teacher (ONNX Runtime, serving session options, 1 thread) on n
    candidates of one request (interacted features handed in, as for the eager teacher)."""
    from recstack.serving.loading import onnx_session as serving_session

    sess = serving_session(Path(onnx_path), 1)
    width = next((i.shape[-1] for i in sess.get_inputs() if i.name == "item_dense"), 1)
    feeds = request_inputs(np.random.default_rng(seed + 2), vocab, n, width if isinstance(width, int) else 1)
    return lambda: sess.run(None, feeds)
