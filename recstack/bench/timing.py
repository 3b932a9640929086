"""Timing and the machine a benchmark runs on: `time_ms` and `time_interleaved` (medians over
timed repeats after warm-up), the machine's description, its load average, and the
single-threaded context every model-cost figure is measured in. Every benchmark takes these
from here, so that their reports describe the machine the same way."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def _summary(xs: list[float]) -> dict:
    """Sorted ms -> {median, min, max, p10, p90, repeats}."""
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1],
            "p10": float(np.percentile(xs, 10)), "p90": float(np.percentile(xs, 90)), "repeats": len(xs)}


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> dict:
    """Run `fn` `warmup` times untimed, then `repeats` times timed -> ms summary (median first)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t0) * 1e3)
    xs.sort()
    return _summary(xs)


def time_interleaved(fns: dict[str, tuple[Callable[[], object], int]], warmup: int = 1) -> dict[str, dict]:
    """Time several paths round-robin, so a change in the machine's load (it is shared) hits
    all of them alike and their ratios stay comparable: `fns` maps name -> (fn, repeats); each
    path runs `warmup` times untimed, then its repeats are spread evenly over the rounds
    (a path with fewer repeats runs in fewer rounds). -> name -> time_ms-style summary."""
    if any(r < 1 for _, r in fns.values()):
        raise ValueError("repeats must be >= 1")
    for fn, _ in fns.values():
        for _ in range(warmup):
            fn()
    rounds = max(r for _, r in fns.values())
    xs: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds):
        for k, (fn, r) in fns.items():
            if (i + 1) * r // rounds == i * r // rounds:  # r of the `rounds` rounds, evenly spread
                continue
            t0 = time.perf_counter()
            fn()
            xs[k].append((time.perf_counter() - t0) * 1e3)
    return {k: _summary(sorted(v)) for k, v in xs.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    """The 1 / 5 / 15 minute load averages, rounded to 0.01 ([] where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the third on (the command name, field 2, may hold spaces and
    parentheses: the fields after it start past its last ')'); None where unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (Linux /proc); None where unreadable."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def process_tree_cpu_s(pid: int) -> float:
    """`cpu_seconds` of process `pid` and every live descendant (a server's workers are its
    children) summed -> seconds; 0.0 where /proc cannot be read."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(d.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(d.name))  # field 4: the parent's pid
    total, stack = 0.0, [pid]
    while stack:
        q = stack.pop()
        total += cpu_seconds(q) or 0.0
        stack += children.get(q, [])
    return float(total)


def machine_info() -> dict:
    import onnxruntime as ort

    info = {
        "hostname": platform.node(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
        info["transparent_hugepages"] = thp[thp.index("[") + 1:thp.index("]")] if "[" in thp else thp
    except (OSError, ValueError):
        info["transparent_hugepages"] = "unknown"
    try:  # numpy madvise()s large arrays onto huge pages when THP is `madvise`; the gather depends on it
        info["numpy_madvise_hugepage"] = bool(np._core.multiarray._get_madvise_hugepage())
    except AttributeError:
        info["numpy_madvise_hugepage"] = None
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = sorted({f"{d.get('internal_api')} {d.get('version')}" for d in threadpool_info()
                               if d.get("user_api") == "blas"})
    except ImportError:
        info["blas"] = []
    return info


def single_threaded(stack: ExitStack) -> dict:
    """Pin torch and BLAS to one thread for the duration of `stack`; -> what was pinned."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    stack.callback(torch.set_num_threads, prev)
    pinned = {"torch_threads": 1, "onnxruntime_intra_op": 1, "onnxruntime_inter_op": 1}
    try:
        from threadpoolctl import threadpool_limits

        stack.enter_context(threadpool_limits(limits=1))
        pinned["blas_threads"] = 1
    except ImportError:
        pinned["blas_threads"] = "not pinned (threadpoolctl missing)"
    return pinned
