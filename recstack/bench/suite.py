"""Every benchmark section in one run (`recstack bench all`): the model costs with the trained
teacher (torch eager and ONNX Runtime), the retrieval index's point, the serving path in
process, and end to end through gRPC with the single-stage and teacher-as-coarse peers and
GMV@50 against the world's truth.

    from recstack.bench.suite import Sizes, run_all
    res = run_all("OUT_DIR", data_dir="DATA_DIR", artifacts="ARTIFACTS", teacher="TEACHER_RUNS/coarse",
                  scratch="SCRATCH_DIR")

The teacher is an input (recstack.bench.teacher: a coarse run trained with `teacher=pfd_md`
and a training state, or a teacher file); nothing is trained here.
"""
from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from recstack.bench import e2e as E2E
from recstack.bench import models as M
from recstack.bench import report as R
from recstack.bench import serving_path as SP
from recstack.bench import teacher as T
from recstack.bench.timing import loadavg, machine_info, single_threaded
from recstack.evaluation import report as E

ALL_SCHEMA = "recstack.bench.all/1"
QUICK_LOAD = {"qps": 20.0, "duration": 2.0, "sweep_duration": 1.0, "sweep_steps": 2, "sat_qps": 100.0, "sat_duration": 1.5,
              "peer_qps": 5.0, "peer_sweep_start": 5.0, "peer_sat_qps": 40.0, "timeout": 2.0,
              "warmup_duration": 0.5}


@dataclass
class Sizes:
    """How much each section measures."""

    n_candidates: int = 100_000  # coarse model cost: candidates of one request
    fine_candidates: int = 500  # fine model cost: candidates of one request
    repeats: int | None = None  # timed repeats of every model path (None: models.DEFAULT_REPEATS)
    retrieval_queries: int = 200  # test-day queries of the retrieval point
    serving_requests: int = 200  # test-day requests of the in-process serving path
    gmv_users: int = 100  # test-day users of GMV@50 against the truth

    def quick(self) -> "Sizes":
        """Small sizes, for tests (not a report)."""
        return Sizes(min(self.n_candidates, 5_000), self.fine_candidates, self.repeats, min(self.retrieval_queries, 10),
                     min(self.serving_requests, 10), min(self.gmv_users, 8))


def _models(data_dir, runs, teacher: str | Path, scratch: Path, sizes: Sizes, reps: dict, seed: int) -> dict:
    """The model-cost sections, with the trained teacher in torch eager and in ONNX Runtime."""
    with ExitStack() as stack:
        threads = single_threaded(stack)
        vocab, vocab_source = M.vocab_for(data_dir)
        tmodel, tvocab, tinfo = T.load_teacher(teacher, data_dir)
        tonnx = T.export_teacher_onnx(tmodel, tvocab, scratch / "teacher.onnx", seed, data_dir)
        tinfo["onnx"] = tonnx
        student, _, cinfo = M.coarse_models(vocab, runs, seed)
        coarse = M.bench_coarse(student, tmodel, vocab, sizes.n_candidates, reps, seed, extra=lambda n, _c: {
            "teacher_dnn_onnxruntime": (T.teacher_onnx_fn(tonnx["path"], vocab, n, seed), reps["teacher"])})
        coarse["ratios"]["coarse_speedup_vs_teacher_onnxruntime"] = (
            coarse["timings_ms"]["teacher_dnn_onnxruntime"]["median"] / coarse["timings_ms"]["inner_product_serving"]["median"])
        del student, tmodel
        fmodel, finfo = M.fine_model(vocab, runs, seed)
        fine = M.bench_fine(fmodel, finfo["vocab"], sizes.fine_candidates, reps, seed)
        del fmodel
    models = {"vocab_source": vocab_source, "n_items": vocab.n_items,
              "coarse": {"source": cinfo["source"] + "; the teacher timed is the trained PFD+MD teacher below",
                         "teacher": "pfd_md", "teacher_hidden": tinfo["hidden"], "manner": tinfo["manner"]},
              "fine": {"source": finfo["source"], "task": "ctr", "hidden": finfo["hidden"], "emb_dim": finfo["emb_dim"]},
              "teacher": tinfo}
    return {"models": models, "coarse": coarse, "fine": fine, "threads": threads}


def _serving(cascade, artifacts, data_dir, teacher_onnx: str, sizes: Sizes, seed: int) -> dict:
    """The in-process sections: retrieval point, serving path, coarse stage as served."""
    tcascade = E2E.TeacherCoarseCascade.load(artifacts, teacher_onnx=teacher_onnx, warm=False)
    stage_sizes = dict(E2E.CASCADE)
    with ExitStack() as stack:  # one BLAS thread, as `recstack serve` runs
        single_threaded(stack)
        out = {"retrieval": SP.bench_retrieval_point(cascade, data_dir, sizes.retrieval_queries, seed=seed),
               "serving": SP.bench_serving_path(cascade, data_dir, sizes.serving_requests, stage_sizes, seed),
               "coarse_stage_served": SP.bench_coarse_stage_served(cascade, tcascade, data_dir,
                                                                   min(sizes.serving_requests, 50), stage_sizes, seed)}
    del tcascade
    return out


def run_all(out_dir: str | Path, *, data_dir: str | Path, artifacts: str | Path, teacher: str | Path,
            scratch: str | Path, runs: str | Path | None = None, sizes: Sizes | None = None,
            configs: str | None = None, load: dict | None = None, quick: bool = False, seed: int = 0,
            command: str | None = None, notes: list[str] | None = None) -> dict:
    """Every section of the benchmark in one run, written to `out_dir` (report.md, results.json,
    bench.png and the end-to-end PNGs):

    - models: coarse inner product (served fused path, and numpy's gather + matvec) vs the PFD+MD
      teacher DNN (torch eager and ONNX Runtime) vs a memory scan, 1e5 candidates; fine ONNX Runtime
      vs eager + parity, 500 candidates (plus ONNX Runtime options and int8 with their parity);
    - retrieval: recall@1000 / @10,000 and latency of the bundle's index vs exact search;
    - serving path in process: per-stage ms and a cProfile; the coarse stage as served, inner
      product vs teacher;
    - end to end through gRPC (`recstack.bench.e2e`): the cascade and its peers (single stage,
      teacher as coarse) with throughput ratios, and GMV@50 against the world's truth.

    `teacher`: the trained teacher (recstack.bench.teacher.load_teacher); `scratch`: the
    teacher's ONNX file and the servers' logs. `quick`: small sizes and seconds-long load runs
    (tests, not a report).
    """
    from recstack.serving.cascade import Cascade

    sizes = sizes or Sizes()
    if quick:
        sizes = sizes.quick()
    reps = M.repeats_for(quick, sizes.repeats)
    T.check_exists(teacher)  # before anything is written
    out, scratch = Path(out_dir), Path(scratch)
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = machine_info()
    machine["loadavg_start"] = loadavg()
    res: dict = {"schema": ALL_SCHEMA, "machine": machine}

    m = _models(data_dir, runs, teacher, scratch, sizes, reps, seed)
    res.update(models=m["models"], coarse=m["coarse"], fine=m["fine"])
    E.write_results(out, {**res, "partial": True})
    tonnx = m["models"]["teacher"]["onnx"]["path"]

    cascade = Cascade.load(artifacts)
    res.update(_serving(cascade, artifacts, data_dir, tonnx, sizes, seed))
    E.write_results(out, {**res, "partial": True})

    load = {**(QUICK_LOAD if quick else {}), **(load or {})}
    res["e2e"] = E2E.run_e2e(str(artifacts), str(data_dir), scratch=scratch / "load", plots=out,
                             configs=configs or E2E.DEFAULT_CONFIGS, teacher_onnx=tonnx, gmv_users=sizes.gmv_users,
                             load=load, cascade=cascade)
    del cascade

    machine["loadavg_end"] = loadavg()
    res["targets"] = M.check_targets({**M.measured_ratios(m["coarse"], m["fine"]),
                                      "server_cpu_ms_per_request": res["serving"]["cpu_ms_per_request"]})
    res["settings"] = {"quick": quick, "n_candidates": sizes.n_candidates, "fine_candidates": sizes.fine_candidates,
                       "repeats": reps, "threads": m["threads"], "seed": seed, "data_dir": str(data_dir),
                       "artifacts": str(artifacts), "runs": str(runs) if runs else None,
                       "retrieval_queries": sizes.retrieval_queries, "serving_requests": sizes.serving_requests,
                       "gmv_users": sizes.gmv_users, "command": command, "wall_s": time.perf_counter() - t_start}
    res["notes"] = list(notes or [])
    E.write_results(out, res)
    R.plot(out / "bench.png", res)
    R.write_report_all(out, res)
    return res


def render_all(out_dir: str | Path, notes: list[str] | None = None) -> Path:
    """Re-write report.md (and bench.png) from out_dir/results.json, with `notes` (when given)
    replacing the notes: the interpretation of a finished run, without re-measuring it."""
    out = Path(out_dir)
    res = json.loads((out / "results.json").read_text())
    if res.get("schema") != ALL_SCHEMA:
        raise ValueError(f"{out / 'results.json'}: schema {res.get('schema')!r}, expected {ALL_SCHEMA!r}")
    if notes is not None:
        res["notes"] = list(notes)
        E.write_results(out, res)
    R.plot(out / "bench.png", res)
    return R.write_report_all(out, res)
