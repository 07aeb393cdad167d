"""Let gloo's worker threads finish with Python before the interpreter shuts down.

The abort this prevents: a gloo rank that finished its work, printed its results (and maybe called
``destroy_process_group()``) dies at interpreter exit with SIGABRT, "terminate called without an
active exception". The aborting thread is one of gloo's worker threads (``pt_gloo_runloop``), seen in
gdb (torch 2.13, Python 3.11)::

    ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> ~AsyncWork -> ~vector<Tensor>
      -> TensorImpl::decref_pyobject -> ConcretePyInterpreterVTable::decref -> gil_scoped_acquire
      -> take_gil -> PyThread_exit_thread -> pthread_exit -> forced unwind hits a noexcept frame
      -> std::terminate

Why: a gloo worker keeps its reference to a finished collective's work object until just after it
wakes the caller. When the caller's tensor is also a Python object, dropping that reference moves the
tensor's refcount from 2 to 1, and torch then decrefs the PyObject, which needs the GIL. If the main
thread holds the GIL and reaches interpreter finalisation before handing it over (it hands it over only
after the switch interval, 5 ms, or when it blocks), Python 3.11 ends the waiting thread with
``pthread_exit``, whose unwinding through the work's ``noexcept`` destructor calls ``std::terminate``.
So any synchronous collective on a Python tensor shortly before exit can do it; under CPU load the
window grows with the scheduling delay of the worker. ``destroy_process_group()`` does not close the
window: it joins gloo's threads only when nothing else (a DDP reducer, a communicator) still holds the
group, and it is the last collective's work that matters, not the group.

:func:`drain_gloo_workers` closes it from our side: it releases the GIL in short sleeps, so a worker
waiting for it takes it while the interpreter is fully alive, until every gloo worker thread of the
process is blocked (waiting for work) in two polls in a row, or a bound passes. :func:`install_exit_drain`
registers it to run at exit, once per process; :func:`~lightning_soaa.distributed.launch.init_from_env`,
:class:`~lightning_soaa.distributed.comm.TorchComm` and importing :mod:`lightning_soaa.lightning` call it.
It changes nothing else: no collective (a rank leaving on an error must not wait for its peers), no
group destroyed, the exit status and any traceback stay the interpreter's own.

Measured on the shared 2-core dev machine (load 7 to 12): two ranks that make three ``all_reduce`` on a
Python tensor and exit (default switch interval) aborted in 17 of 80 runs without the drain, 0 of 80
with it; with the race made deterministic (``tests/distributed/test_teardown.py``) 22 of 22 against 0
of 10. Limits: a collective still running when the drain returns (an async op never waited for, or a
peer that failed) can still finish during finalisation; and a process that never calls one of the
installers above is not covered (``install_exit_drain()`` is public for such scripts).

Thread states come from ``/proc/self/task`` (Linux); elsewhere the drain sleeps once for
:data:`FALLBACK_SLEEP_S`.
"""

from __future__ import annotations

import atexit
import logging
import os
import time

__all__ = ["FALLBACK_SLEEP_S", "GLOO_WORKER_THREAD", "drain_gloo_workers", "gloo_worker_states",
           "install_exit_drain"]

log = logging.getLogger(__name__)

#: The name torch gives gloo's worker threads (``ProcessGroupGloo::runLoop``), as ``/proc`` shows it.
GLOO_WORKER_THREAD = "pt_gloo_runloop"

#: Where thread states cannot be read: one sleep this long, long enough for a runnable worker to be
#: scheduled even on a loaded machine.
FALLBACK_SLEEP_S = 0.05

#: Thread states of a worker that is not running: sleeping, disk wait, idle.
_BLOCKED = frozenset("SDI")

_TASKS = "/proc/self/task"

_installed = False


def gloo_worker_states(task_dir: str = _TASKS) -> list[str] | None:
    """The scheduler states (``"R"``, ``"S"``, ...) of this process's gloo worker threads.

    Returns None when ``task_dir`` cannot be read (not Linux), an empty list when there are none (no gloo
    group, or its threads were joined).
    """
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return None
    states = []
    for tid in tids:
        try:
            with open(os.path.join(task_dir, tid, "stat")) as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended while we listed
        # "tid (name) state ...": the name may hold spaces or parentheses, the state follows the last ")"
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        if name == GLOO_WORKER_THREAD:
            states.append(stat[stat.rfind(")") + 2:stat.rfind(")") + 3])
    return states


def drain_gloo_workers(timeout_s: float = 1.0, poll_s: float = 0.002) -> bool:
    """Release the GIL until every gloo worker thread of this process is blocked, at most ``timeout_s``.

    Call it from the main thread with nothing left to communicate. Blocked means waiting for work, or
    for a peer in a collective that has not finished (a rank leaving on an error): either way the
    worker holds no finished work that would need the GIL.

    Returns:
        True when the workers were seen blocked in two polls in a row (or there are none), False after
        ``timeout_s`` or when thread states cannot be read (then it slept :data:`FALLBACK_SLEEP_S`).
    """
    if timeout_s < 0 or poll_s <= 0:
        raise ValueError(f"Invalid timeout_s={timeout_s}, poll_s={poll_s}. Must be >= 0 and > 0.")
    states = gloo_worker_states()
    if states is None:
        time.sleep(FALLBACK_SLEEP_S)
        return False
    if not states:
        return True
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while True:
        time.sleep(poll_s)  # the GIL is free now: a worker waiting for it takes it
        states = gloo_worker_states() or []
        quiet = quiet + 1 if all(s in _BLOCKED for s in states) else 0
        if quiet >= 2:
            return True
        if time.monotonic() >= deadline:
            log.debug("gloo workers still running after %.2f s at exit: %s", timeout_s, states)
            return False


def _drain_at_exit() -> None:
    try:
        drain_gloo_workers()
    except Exception:  # an exit hook must never change how the process ends
        log.debug("draining gloo workers at exit failed", exc_info=True)


def install_exit_drain() -> None:
    """Run :func:`drain_gloo_workers` when the interpreter exits (``atexit``); once per process.

    Idempotent, and safe with a group the user destroys (or never creates): the drain then finds no
    worker, or only idle ones. A forked child inherits the registration. Exit handlers run last-in
    first-out, so handlers registered after this one (which might still communicate) run before it.
    """
    global _installed
    if _installed:
        return
    atexit.register(_drain_at_exit)
    _installed = True
