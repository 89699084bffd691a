"""Python's garbage collector, watched: its pauses stop the whole reactor.

A full collection walks every tracked object while nothing else runs, so
each one delays every delivery in flight. The server freezes what it built at
start (``freeze_startup_objects``), collects less often than Python's
defaults (``THRESHOLDS``), and counts the time spent collecting, per
generation, for /metrics.
"""

from __future__ import annotations

import gc
import time
from typing import Any


def freeze_startup_objects() -> int:
    """Keep what exists at start out of every later collection; return how many.

    Modules, classes and the service's own objects live as long as the
    process, and are most of the heap: measured under load, a full collection
    took up to 31 ms with them and about 10 ms without.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# Python's defaults are (700, 10, 10): a full collection every 100 young ones
# (when the survivors since the last grew past a quarter of the heap). A full
# collection walks every connection's objects, about 100 ms with 6,000
# connections on a small VM, and under load it came every few seconds: a p99
# of 100-200 ms at 5,000 messages/s where the median was 40. With a full one
# every 1,000 young ones, measured on that shape: one in the whole run, the
# longest pause 31-39 ms, p99 49 ms at 5,000 messages/s and 9 ms at 2,000.
# Larger young generations were tried and lost: (7000, 10, 100) made each
# middle collection 40-75 ms (p99 112 ms at 5,000/s). Cyclic garbage (closed
# connections) waits longer for its collection; the soak test's memory bound
# still holds.
THRESHOLDS = (700, 10, 100)


class GCPauses:
    """Seconds spent in collections, per generation (a gc callback: two clock reads each).

    Installed, it also sets the collector's ``THRESHOLDS`` (and restores the
    ones it found when uninstalled).
    """

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self.longest = 0.0
        self._started = 0.0
        self._thresholds: tuple[int, ...] | None = None

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        if self._thresholds is None:
            self._thresholds = gc.get_threshold()
            gc.set_threshold(*THRESHOLDS)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.seconds[generation] += pause
        self.collections[generation] += 1
        self.longest = max(self.longest, pause)
