"""CPython's cyclic garbage collector, set for a process holding many streams open.

Each stream a task is reading keeps a short chain of coroutine frames parked until its
next event, and every event replaces the chain with a new one. CPython collects its
youngest generation whenever allocations outrun deallocations by 700 objects; with
thousands of streams open, those collections keep finding tens of thousands of young
parked frames to walk (none of them garbage), and the walks grow with the number of
streams. At 3,000 token-by-token streams in one process, collections took 12-39% of
the CPU with the default thresholds, from run to run, and 5-6% with a first threshold
of 10,000 (`benchmarks/scaling.py --sections streams`).
Raising the first threshold makes such collections rare; objects still go away by
reference counting the moment they are unused, and only garbage cycles (rare on the
request path) wait longer.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["GC_THRESHOLD", "tune_gc"]

GC_THRESHOLD: Final = 10_000
"""The generation-0 threshold `tune_gc` sets by default (CPython's is 700)."""


def tune_gc(threshold: int = GC_THRESHOLD, *, freeze: bool = True) -> tuple[int, int, int]:
    """Set the garbage collector for many concurrent streams: generation 0 is collected
    after `threshold` net allocations instead of 700 (the older generations keep their
    thresholds), and with `freeze` everything alive now (modules, configuration, a
    router already open) moves, after one full collection, to the permanent generation
    that no later collection walks again.

    The process's setting, not the router's: an application calls it once at startup
    (``llm-router serve`` does, see ``[gateway] gc_threshold``). Returns the previous
    thresholds; ``gc.set_threshold(*previous)`` (and `gc.unfreeze`) undo it."""
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, not {threshold}")
    previous = gc.get_threshold()
    gc.set_threshold(threshold, previous[1], previous[2])
    if freeze:
        gc.collect()
        gc.freeze()
    return previous
