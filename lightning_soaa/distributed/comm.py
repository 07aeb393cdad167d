"""Communicators: the only place in the package that calls ``torch.distributed``.

Every collective an optimizer makes is one visible line in ``optim/*.py`` calling a method here, or
calling :class:`~lightning_soaa.distributed.exchange.OwnerExchange` (the flat-buffer moves between ranks
and block owners, one collective per dtype) or
:func:`~lightning_soaa.distributed.state_gather.gather_block_states` (checkpoint consolidation), so a
reader can check that all ranks make the same calls, in the same order, with the same shapes.

Layout of one optimizer step with W = 3 ranks and five blocks (owners chosen by
:func:`lightning_soaa.distributed.assignment.assign_owners`)::

    blocks      b0(900)  b1(400)  b2(400)  b3(300)  b4(10)
    owner        r0       r1       r2       r2       r1

    reduce_scatter (optional)     grads  [r0: b0 | r1: b1 b4 | r2: b2 b3]   -> each rank its owned grads
    all_reduce_scalars            [nonfinite flag, partials..., agreement rows]  fp64, W-identical
    (owners update their blocks)
    all_gather_flat               [r0: b0 pad | r1: b1 b4 pad | r2: b2 b3 pad] -> every rank all params

Buffers are padded to the largest per-rank size so that every rank passes equal shapes.

Each communicator counts calls and bytes (what this rank sends into the collective), per step and in
total, so that benchmarks and the Lightning diagnostics can report communication.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from lightning_soaa.distributed.teardown import install_exit_drain

__all__ = [
    "CommStats",
    "Communicator",
    "DeferredComm",
    "LocalComm",
    "TorchComm",
    "default_communicator",
    "comm_device",
    "dist_world",
    "flat_buffers",
    "distributed_running",
    "default_group_ready",
    "gather_flat",
    "gather_object",
    "group_key",
]

# torch 2.13 renamed the flat collectives (the old names now warn on every call, on every rank); older
# torch has only the old names, which take the same arguments.
_ALL_GATHER_FLAT = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_FLAT = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclasses.dataclass
class CommStats:
    """Counts of collectives made by one rank: calls and bytes per operation name."""

    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, op: str, nbytes: int) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        self.bytes[op] = self.bytes.get(op, 0) + int(nbytes)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def copy(self) -> CommStats:
        return CommStats(dict(self.calls), dict(self.bytes))

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {"comm_calls": float(self.total_calls), "comm_bytes": float(self.total_bytes)}
        for op, n in self.bytes.items():
            out[f"comm_bytes_{op}"] = float(n)
        return out


@runtime_checkable
class Communicator(Protocol):
    """What an optimizer needs from a process group. Every method is a collective when W > 1."""

    rank: int
    world_size: int
    step_stats: CommStats
    total_stats: CommStats

    def begin_step(self) -> None: ...

    def all_reduce_scalars(self, values: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather_flat(self, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...

    def reduce_scatter_flat(self, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...


class _StatsMixin:
    def _init_stats(self) -> None:
        self.step_stats = CommStats()
        self.total_stats = CommStats()
        self.last_step_stats = CommStats()

    def begin_step(self) -> None:
        """Start counting a new optimizer step; the previous step's counts stay in ``last_step_stats``."""
        self.last_step_stats = self.step_stats
        self.step_stats = CommStats()

    def _count(self, op: str, nbytes: int) -> None:
        self.step_stats.add(op, nbytes)
        self.total_stats.add(op, nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _ByteCount:
    """A file that keeps only the number of bytes written to it."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: Any) -> int:
        self.n += len(data)
        return len(data)


def _pickled_size(obj: Any) -> int:
    """``len(pickle.dumps(obj))`` without holding the bytes (a consolidated optimizer state is as large as
    the state: ``dumps`` held a second copy of it on every rank while counting)."""
    sink = _ByteCount()
    pickle.Pickler(sink).dump(obj)
    return sink.n


def gather_object(comm: Any, obj: Any, dst: int) -> list[Any] | None:
    """Collective: every rank's ``obj``, in rank order, on rank ``dst`` only (None on the others).

    Through ``comm.gather_object`` where it has one (this module's communicators); a communicator of the
    user's own, with only the :class:`Communicator` protocol's ``all_gather_object``, gathers to every rank
    and the others drop it."""
    method = getattr(comm, "gather_object", None)
    if method is not None:
        out: list[Any] | None = method(obj, dst)
        return out
    everyone = comm.all_gather_object(obj)
    return everyone if comm.rank == dst else None


def gather_flat(comm: Any, buffer: torch.Tensor, dst: int) -> torch.Tensor | None:
    """Collective: every rank's equal-length 1-D ``buffer``, rank-major in one ``[W * len]`` tensor, on rank
    ``dst`` only (None on the others). Through ``comm.gather_flat`` where it has one; a communicator of the
    user's own, with only the :class:`Communicator` protocol's ``all_gather_flat``, gathers to every rank
    and the others drop it."""
    method = getattr(comm, "gather_flat", None)
    if method is not None:
        out: torch.Tensor | None = method(buffer, dst)
        return out
    everyone = comm.all_gather_flat(buffer)
    return everyone if comm.rank == dst else None


class LocalComm(_StatsMixin):
    """The single-process communicator: every collective is the identity and nothing is counted."""

    def __init__(self) -> None:
        self.rank = 0
        self.world_size = 1
        self._init_stats()

    def all_reduce_scalars(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(torch.float64)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_flat(self, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return buffer

    def reduce_scatter_flat(self, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return buffer

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def gather_object(self, obj: Any, dst: int) -> list[Any] | None:
        return [obj]

    def gather_flat(self, buffer: torch.Tensor, dst: int) -> torch.Tensor | None:
        return buffer

    def __repr__(self) -> str:
        return "LocalComm()"


class TorchComm(_StatsMixin):
    """A communicator over a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU).

    Scalars are reduced in float64 so that every rank derives bit-identical trust-region and damping
    decisions. Flat buffers are reduced in their own dtype; callers pad them to equal shapes.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "TorchComm needs an initialized torch.distributed process group; "
                "call torch.distributed.init_process_group first or use LocalComm."
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # the default group this communicator's ranks were read from (see :meth:`stale`)
        self._world = dist.group.WORLD if _is_default_group(group) else None
        backend = dist.get_backend(group)
        # NCCL only reduces tensors that live on the GPU; gloo only on the CPU.
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        self._init_stats()
        # our collectives run on Python tensors: let gloo's workers drop them before interpreter exit
        install_exit_drain()

    def stale(self) -> bool:
        """Whether the default process group this communicator runs on was destroyed and initialized again
        since it was built (a second ``init_process_group`` in the same processes: a notebook, a second
        fit): ``rank`` and ``world_size`` were read from the old one, and with the ranks in another order
        the optimizer's owned blocks were another rank's (3.3 off the one-process run, silently). The
        optimizer then re-attaches as a pickled one does (:class:`DeferredComm`: every rank checks its rank
        and the world size in one all-reduce of the new group, and every rank raises where any moved)."""
        return self._world is not None and dist.group.WORLD is not self._world

    def _to_comm_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device)

    def all_reduce_scalars(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small vector across ranks in float64; the result is identical on every rank. ``values`` is
        handed over: a float64 vector on :attr:`device` (gloo: the CPU tensor the callers make) holds the sum
        itself; another is copied into a float64 buffer on :attr:`device` kept per length (NCCL). Neither
        allocates between the agreement before this call and the call (a copy made there, failing on one rank,
        raised alone while the others waited in the all-reduce: NCCL hangs). Left: the callers' own ``torch.tensor``
        of the values (host memory, about a kilobyte for the step record) and, under NCCL, the host copy of the
        result: a process that cannot allocate a kilobyte of host memory is lost whatever the optimizer does."""
        flat = values.detach().reshape(-1)
        buf = flat
        if flat.dtype != torch.float64 or flat.device != self.device or not flat.is_contiguous():
            buf = self._scalar_buffer(flat.numel())
            buf.copy_(flat)
        self._count("all_reduce", _nbytes(buf))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return buf if buf is flat else buf.to(values.device, copy=True)

    def _scalar_buffer(self, n: int) -> torch.Tensor:
        """:meth:`all_reduce_scalars`'s float64 buffer of ``n`` values on :attr:`device`, made at the first call of
        that length and kept (the agreements' lengths are fixed: the step record, the meeting, the checks)."""
        bufs: dict[int, torch.Tensor] = self.__dict__.setdefault("_scalar_bufs", {})
        buf = bufs.get(n)
        if buf is None:
            buf = bufs[n] = torch.empty(n, dtype=torch.float64, device=self.device)
        return buf

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum of a tensor across ranks (used for Gram matrices and gradients)."""
        buf = self._to_comm_device(tensor)
        self._count("all_reduce", _nbytes(buf))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def all_gather_flat(self, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Gather equal-length 1-D buffers from all ranks into one ``[W * len]`` tensor, rank-major. ``out``: that
        tensor, made by the caller (:func:`flat_buffers`) before an agreement that carries a failure to make it;
        with ``buffer`` on :attr:`device` nothing is allocated here, where a failure would be this rank's alone."""
        buf = self._to_comm_device(buffer.reshape(-1))
        if out is None:
            out = torch.empty(buf.numel() * self.world_size, dtype=buf.dtype, device=buf.device)
        self._count("all_gather", _nbytes(buf))
        _ALL_GATHER_FLAT(out, buf, group=self.group)
        return out.to(buffer.device)

    def reduce_scatter_flat(self, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum ``[W * len]`` buffers across ranks and return this rank's ``len`` slice (``out``: as for
        :meth:`all_gather_flat`)."""
        buf = self._to_comm_device(buffer.reshape(-1))
        if buf.numel() % self.world_size:
            raise ValueError(
                f"reduce_scatter_flat needs a length divisible by world_size={self.world_size}, "
                f"got {buf.numel()}"
            )
        if out is None:
            out = torch.empty(buf.numel() // self.world_size, dtype=buf.dtype, device=buf.device)
        self._count("reduce_scatter", _nbytes(buf))
        _REDUCE_SCATTER_FLAT(out, buf, op=dist.ReduceOp.SUM, group=self.group)
        return out.to(buffer.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Gather a picklable object from every rank (checkpoint consolidation; not for hot paths)."""
        out: list[Any] = [None] * self.world_size
        self._count("all_gather_object", _pickled_size(obj))
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_object(self, obj: Any, dst: int) -> list[Any] | None:
        """Gather a picklable object from every rank onto rank ``dst`` of this group (its rank order); the
        other ranks send theirs and get None (``consolidate_state_dict(to=dst)``: only ``dst`` holds, and
        unpickles, every rank's state)."""
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        self._count("gather_object", _pickled_size(obj))
        # torch's dst is a global rank (group_dst, the rank in the group, is torch >= 2.6 only)
        to = dst if self.group is None or _is_default_group(self.group) else dist.get_global_rank(self.group, dst)
        dist.gather_object(obj, out, dst=to, group=self.group)
        return out

    def gather_flat(self, buffer: torch.Tensor, dst: int) -> torch.Tensor | None:
        """Gather equal-length 1-D buffers onto rank ``dst`` of this group into one ``[W * len]`` tensor,
        rank-major; None on the other ranks (checkpoint consolidation: only ``dst`` receives)."""
        buf = self._to_comm_device(buffer.reshape(-1))
        out = torch.empty(buf.numel() * self.world_size, dtype=buf.dtype, device=buf.device) \
            if self.rank == dst else None
        self._count("gather", _nbytes(buf))
        to = dst if self.group is None or _is_default_group(self.group) else dist.get_global_rank(self.group, dst)
        dist.gather(buf, None if out is None else list(out.chunk(self.world_size)), dst=to, group=self.group)
        return None if out is None else out.to(buffer.device)

    def __repr__(self) -> str:
        return f"TorchComm(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    # A process group is a handle into this process's runtime: it cannot cross a pickle, but a deepcopy
    # (same process) may keep using it.
    def __deepcopy__(self, memo: dict[int, Any]) -> TorchComm:
        """The same group with fresh counters (the copy's collectives are its own)."""
        return TorchComm(self.group)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as a :class:`DeferredComm` that re-attaches at its first collective."""
        return (DeferredComm, (self.rank, self.world_size, _is_default_group(self.group)))


def comm_device(comm: Any, default: torch.device) -> torch.device:
    """The device ``comm``'s collectives run on (gloo: the CPU, NCCL: the GPU); ``default`` for one process. A
    buffer made there is handed to the collective as it is (no copy: an allocation inside the collective's call,
    where a failure would be this rank's alone)."""
    if isinstance(comm, DeferredComm):
        comm = comm._real  # (attached by the step's begin_step: attaching is a collective, never made here)
    device = getattr(comm, "device", None)
    return device if isinstance(device, torch.device) else default


def flat_buffers(comm: Any, send: int, out: int, dtype: torch.dtype, default: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(send, out) for a flat collective whose own allocations must come before an agreement: ``send`` zeros
    (the padding of a packed buffer), ``out`` uninitialized, both on :func:`comm_device`."""
    device = comm_device(comm, default)
    return (torch.zeros(send, dtype=dtype, device=device), torch.empty(out, dtype=dtype, device=device))


def _is_default_group(group: dist.ProcessGroup | None) -> bool:
    return group is None or group == dist.group.WORLD


def group_key(comm: Any) -> int:
    """One key per process group a communicator runs its collectives on: the default group's whether it
    was passed as None or as ``dist.group.WORLD`` (the same collectives), else the group object's id."""
    group = getattr(comm, "group", None)
    return id(None) if _is_default_group(group) else id(group)


class DeferredComm:
    """What a pickled :class:`TorchComm` becomes: the rank and world size it was built for, and no group.

    At its first collective it attaches to the **default** process group, which by then must be
    initialized with the same world size and this process at the same rank (the optimizer's block table,
    i.e. which blocks this rank owns, was built for them); the ranks agree on that in one all-reduce, so
    when any rank moved every rank raises ``RuntimeError`` on that first use, naming the fix: to continue
    at another world size, save ``state_dict()`` and load it into a new optimizer; for a non-default
    group, assign ``opt.comm = TorchComm(group)`` after unpickling. Counters read before the first
    collective are empty.
    """

    def __init__(self, rank: int, world_size: int, default_group: bool = True, origin: str = "pickled") -> None:
        self.rank = rank
        self.world_size = world_size
        self.default_group = default_group
        self.origin = origin  # how it came to stand for a group it is not attached to (the messages say it)
        self._real: TorchComm | None = None
        self._empty = CommStats()

    def attach(self) -> TorchComm:
        """The communicator this one stands for (created on first use); raises when it cannot be."""
        if self._real is not None:
            return self._real
        where = f"rank {self.rank} of world size {self.world_size}"
        if not self.default_group:
            raise RuntimeError(
                f"This optimizer was pickled on {where} over a non-default process group, which cannot be "
                "restored from a pickle; assign opt.comm = lightning_soaa.distributed.comm.TorchComm(group) "
                "on every rank before stepping."
            )
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"This optimizer was {self.origin} on {where}; call torch.distributed.init_process_group (same "
                "world size, same rank) before using it, or save state_dict() and load it into a new "
                "optimizer to continue at another world size."
            )
        real = TorchComm(None)
        moved = (real.rank, real.world_size) != (self.rank, self.world_size)
        # One agreement, once: a rank that is where it was pickled must not walk into a collective that
        # the moved ranks will never join, so every rank raises when any rank moved.
        moved_ranks = int(real.all_reduce_scalars(torch.tensor([float(moved)]))[0])
        if moved_ranks:
            raise RuntimeError(
                f"This optimizer was {self.origin} on {where} but is used on rank {real.rank} of world size "
                f"{real.world_size} ({moved_ranks} rank(s) moved); it owns the blocks of its old rank. Save "
                "state_dict() and load it into a new optimizer to continue at another world size (with "
                "consolidate_state_dict() first, before the old process group is destroyed)."
            )
        self._real = real
        return real

    @property
    def step_stats(self) -> CommStats:
        return self._empty if self._real is None else self._real.step_stats

    @property
    def total_stats(self) -> CommStats:
        return self._empty if self._real is None else self._real.total_stats

    @property
    def last_step_stats(self) -> CommStats:
        return self._empty if self._real is None else self._real.last_step_stats

    def begin_step(self) -> None:
        self.attach().begin_step()

    def all_reduce_scalars(self, values: torch.Tensor) -> torch.Tensor:
        return self.attach().all_reduce_scalars(values)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.attach().all_reduce_(tensor)

    def all_gather_flat(self, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.attach().all_gather_flat(buffer, out)

    def reduce_scatter_flat(self, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.attach().reduce_scatter_flat(buffer, out)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.attach().all_gather_object(obj)

    def gather_object(self, obj: Any, dst: int) -> list[Any] | None:
        return self.attach().gather_object(obj, dst)

    def gather_flat(self, buffer: torch.Tensor, dst: int) -> torch.Tensor | None:
        return self.attach().gather_flat(buffer, dst)

    def __reduce__(self) -> tuple[Any, ...]:
        return (DeferredComm, (self.rank, self.world_size, self.default_group))

    def __repr__(self) -> str:
        state = "attached" if self._real is not None else "not attached yet"
        return f"DeferredComm(rank={self.rank}, world_size={self.world_size}, {state})"


def default_communicator(process_group: dist.ProcessGroup | None = None) -> LocalComm | TorchComm:
    """``TorchComm`` over ``process_group`` (or the default group) when torch.distributed runs with W > 1."""
    if dist.is_available() and dist.is_initialized():
        if process_group is not None and dist.get_world_size(process_group) < 1:
            # what dist.new_group(ranks) hands a rank outside ``ranks``: its world size reads -1, which ran
            # the optimizer as one process on that rank, silently training alone
            raise ValueError(
                f"Invalid process_group: rank {dist.get_rank()} is not a member of it (dist.new_group returns "
                "that handle to the ranks left out). Build the optimizer only on the group's ranks, with the "
                "group the rank belongs to.")
        if dist.get_world_size(process_group) > 1:
            return TorchComm(process_group)
    elif process_group is not None:
        raise ValueError("process_group was given but torch.distributed is not initialized")
    return LocalComm()


def dist_world() -> Any:
    """The default process group object now (None without one): a new one after destroy_process_group and
    init_process_group, so an identity comparison tells a re-initialized group from the old one."""
    return dist.group.WORLD if distributed_running() else None


def distributed_running() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def default_group_ready() -> bool:
    """True when the default process group exists with more than one rank: an optimizer that was built
    before it existed (and so runs on a :class:`LocalComm`) must join it before its next collective."""
    return distributed_running() and dist.get_world_size() > 1
