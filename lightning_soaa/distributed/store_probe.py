"""Reach a TCP store in bounded time: whether anything listens at an address, and a store client whose
handshake cannot hang (torch's TCPStore client waits past its own timeout for an answer from whatever accepts
the connection). Used by the rendezvous of :mod:`~lightning_soaa.distributed.mpi_rendezvous` and
:mod:`~lightning_soaa.distributed.attempt_store`."""

from __future__ import annotations

import datetime
import socket
import threading
import time

import torch.distributed as dist

__all__: list[str] = []

#: how often the rendezvous loops look again (rank 0 at the round's counters; a rank at a published value)
_STORE_POLL_S = 0.05


def _store_client(addr: str, port: int, world_size: int, timeout: datetime.timedelta,
                  seconds: float) -> tuple[dist.Store | None, str]:
    """A client of the store at ``addr:port``, or ``None`` and why. TCPStore's handshake waits without bound
    for an answer from whatever accepts the connection (a service that is not a store never answers: the rank
    hung there while the others waited in ``MPI_Init``), so it runs in a thread given ``seconds``."""
    box: list[dist.Store | BaseException] = []

    def connect() -> None:
        try:
            box.append(dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout,
                                     wait_for_workers=False))
        except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
            box.append(e)

    thread = threading.Thread(target=connect, name="lightning_soaa-store-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    if not box:
        # the thread stays blocked on that socket until the service closes it and the client's own timeout
        # passes; nothing waits for it (a process that exits while it still runs may end in an abort message)
        return None, (f"something accepts connections there but does not answer as a torch TCPStore within "
                      f"{seconds:g} s: another service on that port?")
    result = box[0]
    return (None, str(result)) if isinstance(result, BaseException) else (result, "")


def _listening(addr: str, port: int, seconds: float) -> bool:
    """Whether something accepts connections at ``addr:port`` within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(5.0, left))):
                return True
        except OSError:  # refused, unreachable, or a name that does not resolve (yet)
            if left <= 0:
                return False
            time.sleep(min(0.2, max(left, 0.0)))
