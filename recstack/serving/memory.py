"""Giving a serving process's freed heap back to the operating system."""
from __future__ import annotations

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
