"""Median CPU time of a call, the measure every benchmark here reports (the machine is shared, and CPU
time of the process is far less sensitive than wall time to other jobs), and the count of ATen operator calls
(deterministic and load-independent: the unit tests' operator budgets count with the same class)."""

from __future__ import annotations

import cProfile
import io
import logging
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


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


class CountOps(TorchDispatchMode):
    """Counts the ATen operator calls made inside it (``n``)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


#: the operators that copy a value to the host (a synchronisation on an accelerator)
HOST_READS = frozenset({"aten.item.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default"})


class CountReads(CountOps):
    """:class:`CountOps` that also counts the host reads among the calls (``reads``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.reads += str(func) in HOST_READS
        return super().__torch_dispatch__(func, types, args, kwargs)
