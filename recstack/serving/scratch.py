"""Per-thread scratch arrays over the item-id space: deduplication and membership tests over a
request's candidates in O(candidates), without a sort."""
from __future__ import annotations

import threading

import numpy as np


class IdScratch:
    """Per-thread scratch arrays over the item-id space, so deduplication and membership tests
    over a request's candidates cost O(candidates) instead of a sort (np.unique / np.isin).

    `pos` (int32) holds, after `first_occurrences`, the first position of each id just written;
    `stamp` (int32) marks the ids of one set with a per-thread counter that only grows, so a
    stale mark from an earlier request never matches. Every slot read in a call was written in
    the same call (or holds an older, smaller stamp), so the arrays are never cleared."""

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.pos = np.zeros(n_items, np.int32)  # lazily zero-filled pages: 8 bytes per item per thread in all
        self.stamp = np.zeros(n_items, np.int32)
        self.counter = 0

    def first_occurrences(self, ids: np.ndarray) -> np.ndarray:
        """-> ids without repeats, each kept at its first position (= np.unique's first indices, sorted)."""
        n = len(ids)
        if n < 2:
            return ids
        ar = np.arange(n, dtype=np.int32)
        self.pos[ids] = n
        np.minimum.at(self.pos, ids, ar)  # the smallest position per id, whatever the write order
        return ids[self.pos[ids] == ar]

    def member(self, ids: np.ndarray, of: np.ndarray) -> np.ndarray:
        """-> bool mask (len(ids),): whether each id is in `of` (= np.isin(ids, of))."""
        if len(of) == 0 or len(ids) == 0:
            return np.zeros(len(ids), bool)
        if self.counter >= np.iinfo(np.int32).max - 1:  # after ~2e9 calls on this thread
            self.stamp.fill(0)
            self.counter = 0
        self.counter += 1
        self.stamp[of] = self.counter
        return self.stamp[ids] == self.counter


class ThreadScratch:
    """One `IdScratch` per thread, created on the thread's first request."""

    def __init__(self, n_items: int):
        self.n_items = n_items
        self._local = threading.local()

    def get(self) -> IdScratch:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = IdScratch(self.n_items)
        return s
