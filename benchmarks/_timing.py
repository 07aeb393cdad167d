"""Median CPU time of a call, the measure every benchmark here reports (the machine is shared, and CPU
time of the process is far less sensitive than wall time to other jobs)."""

from __future__ import annotations

import cProfile
import io
import logging
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any


def median_cpu_s(fn: Callable[[], Any], reps: int, warmup: bool = True) -> float:
    """Median ``time.process_time`` seconds of ``fn()`` over ``reps`` calls (after one untimed call when
    ``warmup``)."""
    if warmup:
        fn()
    ts = []
    for _ in range(reps):
        c = time.process_time()
        fn()
        ts.append(time.process_time() - c)
    return statistics.median(ts)


def log_profile(log: logging.Logger, fn: Callable[[], Any], what: str, lines: int = 25) -> None:
    """Log a cProfile of one ``fn()``, the ``lines`` entries of most cumulative time, headed ``what``."""
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(lines)
    log.info("---- cProfile of %s\n%s", what, buf.getvalue())
