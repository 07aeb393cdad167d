"""Reach a TCP store in bounded time: whether anything listens at an address, and a store client whose
handshake cannot hang (torch's TCPStore client waits past its own timeout for an answer from whatever accepts
the connection). Used by the rendezvous of :mod:`~lightning_soaa.distributed.mpi_rendezvous` and
:mod:`~lightning_soaa.distributed.attempt_store`."""

from __future__ import annotations

import datetime
import select
import socket
import threading
import time

import torch.distributed as dist

__all__: list[str] = []

#: how often the rendezvous loops look again (rank 0 at the round's counters; a rank at a published value)
_STORE_POLL_S = 0.05
#: why a probe failed when what listens accepted the connection and closed it without a store's answer
CLOSED_WITHOUT_ANSWER = "the service there closed the connection without answering as a torch TCPStore"
#: how long the probe's threads get to end once the relay is cut, beyond the probe client's own timeout (a loaded
#: host stalls a loopback connect for seconds at times)
_PROBE_END_S = 10.0


def _store_client(addr: str, port: int, world_size: int, timeout: datetime.timedelta,
                  seconds: float) -> tuple[dist.Store | None, str]:
    """A client of the store at ``addr:port``, or ``None`` and why. TCPStore's handshake waits without bound
    for an answer from whatever accepts the connection (a service that is not a store never answers: the rank
    hung there while the others waited in ``MPI_Init``), so a probe client first makes the handshake through a
    relay this process can cut (:func:`_answers_as_store`); only a service that answered gets the real client.

    The probe leaves no thread behind: a client left blocked on a silent service threw its error when that
    service closed, and if that was during interpreter exit, the thread's wait for the GIL ended the process
    with SIGABRT (exit status 134 after a clean run)."""
    start = time.monotonic()
    why = _answers_as_store(addr, port, seconds)
    if why:
        return None, why
    # It answered a handshake just now: the real client's cannot hang unless the service changed meanwhile,
    # and then it is bounded as the probe's was, its thread left behind (the one case that still leaves one).
    # It gets what is left of ``seconds`` (at least 1 s): a fresh ``seconds`` overran the caller's deadline.
    left = max(1.0, seconds - (time.monotonic() - start))
    return _connect_in_thread(addr, port, world_size, timeout, left)


def _connect_in_thread(addr: str, port: int, world_size: int, timeout: datetime.timedelta,
                       seconds: float) -> tuple[dist.Store | None, str]:
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
        return None, _silent(seconds)
    result = box[0]
    return (None, str(result)) if isinstance(result, BaseException) else (result, "")


def _silent(seconds: float) -> str:
    return (f"something accepts connections there but does not answer as a torch TCPStore within {seconds:g} s: "
            "another service on that port?")


def _answers_as_store(addr: str, port: int, seconds: float) -> str:
    """``""`` when what listens at ``addr:port`` answers a TCPStore client's handshake within ``seconds``, else why.

    The probe client connects to a relay on the loopback that forwards to ``addr:port`` (:class:`_Relay`): when
    no answer comes, cutting the relay ends the client's wait, and its thread ends before this returns (its own
    timeout, ``seconds`` too, has passed by then: its retry of the cut relay fails at once)."""
    try:
        upstream = socket.create_connection((addr, port), timeout=max(0.1, seconds))
    except OSError as e:  # refused, unreachable: as the client itself would fail
        return f"cannot connect ({e})"
    ended = threading.Event()  # the probe has its answer or error, or the relay ended on its own
    relay = _Relay(upstream, ended)
    box: list[BaseException | None] = []

    def probe() -> None:
        client = None
        try:
            # no wait_for_workers: the probe counts in nowhere, the store sees a client come and go
            client = dist.TCPStore("127.0.0.1", relay.port, None, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=seconds))
            box.append(None)
        except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
            box.append(e)
        ended.set()
        del client  # closed only now: the relay, ending when it closes, never reports before the answer is in

    thread = threading.Thread(target=probe, name="lightning_soaa-store-probe", daemon=True)
    thread.start()
    try:
        ended.wait(seconds)
        answered = list(box)  # what came before the cut: after it, the client fails whatever listens there
    finally:
        # also when the wait is interrupted (a signal handler's exception): a client left on a relay that a
        # closing service ends throws at its deadline, and during the interpreter's exit that aborted the process
        relay.close()  # the probe client's wait ends (end of stream), its retry is refused: it raises
        # to its end, which its own timeout bounds (the relay ended early: the service closed the connection)
        thread.join(seconds + _PROBE_END_S)
    if answered:
        return "" if answered[0] is None else str(answered[0])
    if relay.ended_by_peer:
        return CLOSED_WITHOUT_ANSWER
    return _silent(seconds)


class _Relay:
    """One connection from the loopback, relayed to ``upstream`` by a Python thread that :meth:`close` ends,
    closing both sides (the listener takes one connection: a retry of the client is refused, never held)."""

    def __init__(self, upstream: socket.socket, ended: threading.Event) -> None:
        self._upstream = upstream
        # no SO_REUSEADDR (socket.create_server sets it): a port still in TIME_WAIT is not taken
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._ended = ended
        #: whether the relay ended before :meth:`close` (a side closed its stream, or failed)
        self.ended_by_peer = False
        self._thread = threading.Thread(target=self._run, name="lightning_soaa-store-relay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(_PROBE_END_S)

    def _run(self) -> None:
        conn = None
        try:
            self._listener.settimeout(_STORE_POLL_S)
            while conn is None and not self._stop.is_set():
                try:
                    conn = self._listener.accept()[0]
                except TimeoutError:
                    continue
            self._listener.close()
            if conn is not None:
                self._pump(conn)
        except OSError:
            pass  # either side failed: the client sees its connection end
        finally:
            for s in (conn, self._upstream, self._listener):
                if s is not None:
                    s.close()
            self.ended_by_peer = not self._stop.is_set()
            self._ended.set()

    def _pump(self, conn: socket.socket) -> None:
        """Forward bytes both ways until either side ends its stream or :meth:`close` is called."""
        conn.settimeout(_STORE_POLL_S)  # a peer that does not read cannot hold a send past a poll
        self._upstream.settimeout(_STORE_POLL_S)
        other = {conn: self._upstream, self._upstream: conn}
        while not self._stop.is_set():
            ready = select.select(list(other), [], [], _STORE_POLL_S)[0]
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                other[s].sendall(data)


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
