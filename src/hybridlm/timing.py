"""Wall-clock helpers shared by `hybridlm bench`, `eval efficiency` and the scripts in benchmarks/."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def seconds(run: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    return statistics.median(seconds(run) for _ in range(repeats))
