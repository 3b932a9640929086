"""Giving a serving process's freed heap back to the operating system, and keeping a loaded
model's objects out of the garbage collector's full collections."""
from __future__ import annotations

import gc
import threading

_malloc_trim = None


def trim_heap() -> None:
    """Give free heap memory back to the OS. A model's many small allocations (ONNX sessions,
    parquet tables, index structures), freed from several threads, leave fragmented free space
    in malloc's per-thread arenas; RSS keeps counting it, and without a trim it creeps up
    reload after reload. glibc only; elsewhere nothing."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", False)
        except OSError:
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


class HeapFreezer:
    """Moves what is alive once a model is loaded (the model's ~90,000 Python objects, the
    server's own) into the collector's permanent generation (`gc.freeze`), so a full collection
    triggered by calls' allocations walks only the objects made since: on the `small` bundle it
    took ~40 ms of CPU with the GIL held (every Rank thread stalled), and ~0.01 ms frozen.
    Reference counting still frees frozen objects; only reference cycles among them wait for
    `thaw`, which a reload calls so that the previous model's cycles can be collected; the heap
    is frozen again once that model is gone (`due`, then `freeze_if_due` on a later call)."""

    def __init__(self):
        self.due = False
        self._lock = threading.Lock()

    @staticmethod
    def thaw() -> None:
        gc.unfreeze()

    def mark_due(self) -> None:
        self.due = True

    def freeze_if_due(self) -> None:
        """Collect, then freeze what survives, if a load or a freed model asked for it (a flag check otherwise)."""
        if self.due and self._lock.acquire(blocking=False):
            try:
                if self.due:
                    self.due = False
                    gc.collect()
                    gc.freeze()
            finally:
                self._lock.release()
