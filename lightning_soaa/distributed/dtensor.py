"""DTensor (FSDP2 ``fully_shard``) parameters: local shards, the mesh communicator, which sums count.

When an optimizer's parameters include DTensors, the parameters are already sharded by FSDP2, so the
optimizer works like ``shard=False`` (DeepSpeed's flat partitions): every rank updates the local shard
of every parameter, and nothing is all-gathered afterwards. What must be global is reduced over the
parameters' device mesh with the communicator built here (the whole mesh, flattened: for HSDP the
replicate x shard mesh, because the loss and the non-finite flag differ on every data-parallel rank).

Replicated mesh dimensions hold identical local pieces (FSDP2 all-reduces HSDP gradients over them), so
a sum over the whole mesh would count a piece once per replica. Each (parameter, rank) pair therefore
has a ``counted`` flag: a DTensor's local piece counts on the ranks whose coordinate is 0 on every
``Replicate`` mesh dimension; a plain tensor (replicated on every rank) counts on mesh rank 0 only.
Optimizers add only counted pieces to their global sums; the non-finite flag is an OR (any count > 0)
and needs no mask.

Checkpoints stay world-size independent in two forms. ``state_dict()`` gives torch's shape for
``torch.distributed.checkpoint`` (state as DTensors, no gathering; :mod:`lightning_soaa.optim.dcp_state`).
Our consolidated form (``consolidate_state_dict``): :meth:`DTensorLayout.gather_state` turns a rank's local
parameter-shaped state (``exp_avg``-like keys) into the full tensor (an all-gather through DTensor, a
collective: called in parameter order on every rank), :meth:`DTensorLayout.shard_state` cuts a full
tensor back to this rank's piece without communication. Those DTensor all-gathers and the gradient
mean below are the only collectives made outside :mod:`lightning_soaa.distributed.comm`.

A block cut along the sharded dim 0 (ASGO's experts of a ``batch_dims=1`` stack, one index of dim 0 each)
lies whole on the rank whose rows contain it (torch's ``Shard(0)`` splits dim 0 like ``torch.chunk``),
its holder: only that rank steps it and keeps its state (:meth:`DTensorLayout.holds`), which stays
whole in both checkpoint forms (the optimizer gathers the holders' blocks for the consolidated form).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_soaa.distributed.blocks import BlockInfo, writable_grad
from lightning_soaa.distributed.comm import Communicator, LocalComm, TorchComm

__all__ = ["DTensorLayout", "FSDPGroups", "ParamPlacement", "PARAM_LIKE_STATE_KEYS", "fsdp2_unsharded_params",
           "fsdp_groups_on_meshes", "has_dtensor", "is_dtensor", "local", "replicas_may_drift"]

log = logging.getLogger(__name__)

#: state keys shaped like the parameter (or its ``rows x rest`` matrix form): sharded like it.
PARAM_LIKE_STATE_KEYS = frozenset({"exp_avg", "exp_avg_sq"})


@functools.cache  # asked once per parameter by every table build: the import statement costs ~2 µs a call
def _dtensor_cls() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def has_dtensor(params: Sequence[Tensor]) -> bool:
    return any(is_dtensor(p) for p in params)


def local(t: Tensor | None) -> Tensor | None:
    """The local piece of a DTensor (shares storage, so in-place updates reach the parameter)."""
    if t is None or not is_dtensor(t):
        return t
    loc: Tensor = t.to_local()  # type: ignore[attr-defined]  # a DTensor (checked above)
    return loc


@dataclasses.dataclass(frozen=True)
class ParamPlacement:
    """How one parameter lies on this rank."""

    is_dtensor: bool
    counted: bool  # this rank's local piece enters global sums
    row_sharded: bool  # dim 0 is split over ranks (only Shard(0) and Replicate placements)
    sharded_dims: tuple[int, ...]  # tensor dims split over mesh dims
    global_shape: tuple[int, ...]
    #: the mesh dims that split dim 0 (see :meth:`DTensorLayout.rows`)
    dim0_splits: tuple[int, ...] = ()


def _placement_of(p: Tensor, rank: int, label: str, optimizer: str) -> ParamPlacement:
    from torch.distributed.tensor import Replicate, Shard

    if not is_dtensor(p):
        return ParamPlacement(False, rank == 0, False, (), tuple(p.shape))
    mesh = p.device_mesh  # type: ignore[attr-defined]
    coord = mesh.get_coordinate()
    counted = True
    dims: list[int] = []
    dim0_splits: list[int] = []  # the mesh dims that split dim 0
    for mdim, pl in enumerate(p.placements):  # type: ignore[attr-defined]
        if isinstance(pl, Replicate):
            counted = counted and coord is not None and coord[mdim] == 0
        elif isinstance(pl, Shard):
            dims.append(pl.dim % max(p.dim(), 1))
            if dims[-1] == 0:
                dim0_splits.append(mdim)
        elif "Strided" in type(pl).__name__:
            # fully_shard over a tensor-parallel module (a 2-D dp x tp mesh): the shard of a shard
            raise ValueError(
                f"{optimizer}: parameter {label} has placements {tuple(p.placements)}: FSDP2 combined with "  # type: ignore[attr-defined]
                "tensor parallelism (fully_shard over ColwiseParallel/RowwiseParallel layers) is not "
                "supported. Use fully_shard alone (a 1-D or HSDP mesh) or tensor parallelism alone."
            )
        else:
            raise ValueError(
                f"{optimizer}: parameter {label} has placements {tuple(p.placements)}; only Shard and "  # type: ignore[attr-defined]
                "Replicate are supported (a Partial parameter has no well-defined local value). Use "
                "torch.distributed.fsdp.fully_shard, whose parameters are Shard(0) or (Replicate, Shard(0))."
            )
    return ParamPlacement(True, counted, bool(dims) and set(dims) == {0}, tuple(dims), tuple(p.shape),
                          tuple(dim0_splits))


def _dim0_range(p: Any, splits: tuple[int, ...], label: str) -> tuple[int, int]:
    """The global rows ``[start, stop)`` of ``p``'s local piece: torch's ``Shard(0)`` cuts dim 0 like
    ``torch.chunk`` (``ceil(rows / n)`` per rank, the trailing ranks fewer or none), FSDP2's ``fully_shard``
    too. Checked against the local piece, so a layout torch ever cuts otherwise raises here instead of
    addressing the wrong rows."""
    rows = int(p.shape[0])
    if not splits:
        return (0, rows)
    coord = p.device_mesh.get_coordinate()
    if len(splits) > 1 or coord is None:
        raise ValueError(f"parameter {label} of shape {tuple(p.shape)} has dim 0 split over mesh dims "
                         f"{list(splits)} ({tuple(p.placements)}); a block cut along dim 0 needs it split over "
                         "one mesh dim")
    n, c = int(p.device_mesh.size(splits[0])), int(coord[splits[0]])
    chunk = -(-rows // n)
    start = min(c * chunk, rows)
    stop = min(start + chunk, rows)
    held = int(p.to_local().shape[0])
    if held != stop - start:
        raise ValueError(f"parameter {label} of shape {tuple(p.shape)} holds {held} rows of dim 0 on mesh "
                         f"coordinate {c} of {n}; torch.chunk's split gives rows {start}:{stop}. Only torch's "
                         "Shard(0) split as fully_shard makes it is supported.")
    return (start, stop)


def _mesh_ranks(mesh: Any) -> list[int]:
    return [int(r) for r in mesh.mesh.flatten().tolist()]


def _mesh_communicator(mesh: Any, comm: Communicator | None, process_group: Any, optimizer: str) -> Communicator:
    """A communicator over exactly the ranks of ``mesh`` (checked when one is given)."""
    ranks = sorted(_mesh_ranks(mesh))
    if comm is not None:
        given: Any = getattr(comm, "group", "unknown")
        ok = comm.world_size == len(ranks)
        if ok and given != "unknown" and dist.is_initialized():
            ok = sorted(dist.get_process_group_ranks(given) if given is not None
                        else range(dist.get_world_size())) == ranks
        if not ok:
            raise ValueError(
                f"{optimizer}: the communicator {comm!r} does not span the parameters' device mesh "
                f"(ranks {ranks}). Under FSDP2 the global sums run over the whole mesh; pass no comm, or "
                "one over exactly those ranks."
            )
        return comm
    if len(ranks) == 1:
        return LocalComm()
    if process_group is not None:
        if sorted(dist.get_process_group_ranks(process_group)) != ranks:
            raise ValueError(
                f"{optimizer}: process_group spans ranks {sorted(dist.get_process_group_ranks(process_group))}"
                f", the parameters' device mesh spans ranks {ranks}. Pass process_group=None (the mesh "
                "is used) or a group over exactly the mesh's ranks."
            )
        return TorchComm(process_group)
    if len(ranks) == dist.get_world_size():
        return TorchComm(None)
    if mesh.ndim == 1:
        return TorchComm(mesh.get_group())
    # A sub-mesh of 2 or more dims (pipeline stages x HSDP) has no one group of its own: a group over exactly
    # its ranks, made by those ranks alone (only they build this optimizer). This raised, telling each stage
    # to pass new_group(its ranks); torch's new_group needs every rank of the world in each call, and stages
    # that each made their own deadlocked or crossed connections (gloo 'Connection reset by peer' on some
    # ranks, others waiting). With use_local_synchronization only the members enter, as here.
    return TorchComm(dist.new_group(ranks, use_local_synchronization=True))


class DTensorLayout:
    """Per-parameter placements of an optimizer whose parameters include DTensors, and their mesh."""

    def __init__(self, params: Sequence[Tensor], labels: Sequence[str], *, comm: Communicator | None,
                 process_group: Any, optimizer: str) -> None:
        meshes = [(lab, p.device_mesh) for p, lab in zip(params, labels) if is_dtensor(p)]  # type: ignore[attr-defined]
        mesh = meshes[0][1]
        for lab, m in meshes[1:]:
            if m != mesh:
                raise ValueError(
                    f"{optimizer}: parameter {lab} lives on {m}, parameter {meshes[0][0]} on {mesh}. All "
                    "DTensor parameters of one optimizer must share one device mesh; build one optimizer "
                    "per mesh."
                )
        self.mesh = mesh
        self.comm = _mesh_communicator(mesh, comm, process_group, optimizer)
        self.placements = [_placement_of(p, self.comm.rank, lab, optimizer) for p, lab in zip(params, labels)]
        self._params = list(params)
        self._labels = list(labels)
        #: indices of the plain (non-DTensor) parameters: replicas every rank updates from its own gradient
        self.plain = [i for i, pl in enumerate(self.placements) if not pl.is_dtensor]
        #: indices of the DTensor parameters (whose gradients' presence the ranks compare at each step)
        self.sharded = [i for i, pl in enumerate(self.placements) if pl.is_dtensor]

    def counted(self, param_index: int) -> bool:
        return self.placements[param_index].counted

    def is_dtensor(self, param_index: int) -> bool:
        return self.placements[param_index].is_dtensor

    # ------------------------------------------------------------------ gradients of plain tensors
    def mean_plain_grads(self, read: bool = True) -> None:
        """Average the gradients of the non-DTensor parameters over the mesh (``grad_reduction="mean"``):
        FSDP2 reduces only its own parameters. One all-reduce per dtype, every rank, parameter order.

        A parameter has a gradient iff some rank has one (a rank whose batch did not reach it adds
        zeros); one that no rank has a gradient for keeps ``p.grad = None`` and is not stepped, as in one
        process. The same all-reduce carries one presence flag per parameter after the gradients; they
        are read (a host copy) only on a rank without a local gradient. ``read=False``: the step already
        failed on this rank (it raises on every rank after the step's all-reduce): zeros, nothing written
        (a sparse gradient there raised torch's reshape error on this rank alone)."""
        if self.comm.world_size == 1:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p, pl in zip(self._params, self.placements):
            if not pl.is_dtensor:
                by_dtype.setdefault(p.dtype, []).append(p)
        for dt in sorted(by_dtype, key=str):
            ps = by_dtype[dt]
            missing = [p.grad is None or not read for p in ps]
            flags = (torch.tensor([0.0 if m else 1.0 for m in missing], dtype=dt).to(ps[0].device)
                     if any(missing) else torch.ones(len(ps), dtype=dt, device=ps[0].device))
            flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in ps] + [flags])
            self.comm.all_reduce_(flat).div_(self.comm.world_size)
            if not read:
                continue
            present = flat[len(flat) - len(ps):].tolist() if any(missing) else []
            off = 0
            for j, p in enumerate(ps):
                if not missing[j] or present[j] != 0.0:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    writable_grad(p).copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()

    # ------------------------------------------------------------------ blocks cut across the shards
    # A block cut along an unsharded dim (ASGO's column blocks of a row-sharded matrix) has a piece on every
    # rank. A block cut along the sharded dim 0 (ASGO's experts of a batch_dims=1 stack, one index each) lies
    # whole on the rank whose rows contain it, its holder: only that rank steps it and keeps its state.
    def cut_across(self, block: BlockInfo) -> bool:
        """Whether ``block`` is cut along a dim split over ranks (it then lies whole on its holder)."""
        return block.dim is not None and block.dim in self.placements[block.param_index].sharded_dims

    def rows(self, param_index: int) -> tuple[int, int]:
        """The global rows ``[start, stop)`` of dim 0 that this rank's piece of the parameter covers
        (computed on first use: only parameters with blocks cut across the shards need it)."""
        cache: dict[int, tuple[int, int]] = self.__dict__.setdefault("_rows", {})
        if param_index not in cache:
            cache[param_index] = _dim0_range(self._params[param_index], self.placements[param_index].dim0_splits,
                                             self._labels[param_index])
        return cache[param_index]

    def holds(self, block: BlockInfo) -> bool:
        """Whether this rank holds (its piece of) ``block``: always, unless the block is cut across the
        shards and lies on another rank. A block straddling two ranks' rows raises (none is cut so)."""
        if not self.cut_across(block):
            return True
        if block.dim != 0:
            raise ValueError(f"block {block.key} is cut along dim {block.dim}, which is sharded over ranks; "
                             "only dim 0 may be (its blocks then lie whole on one rank)")
        start, stop = self.rows(block.param_index)
        if start <= block.start and block.stop <= stop:
            return True
        if block.stop <= start or block.start >= stop:
            return False
        raise ValueError(f"block {block.key} (rows {block.start}:{block.stop}) straddles this rank's rows "
                         f"{start}:{stop} of the sharded dim 0")

    def local_block(self, block: BlockInfo, piece: Tensor) -> Tensor:
        """``block``'s view into this rank's ``piece`` of the parameter (or of its gradient): a block cut
        across the shards is addressed from this rank's first row (call only for a block it holds)."""
        if not self.cut_across(block):
            return block.view(piece)
        start = self.rows(block.param_index)[0]
        return piece.narrow(0, block.start - start, block.stop - block.start)

    # ------------------------------------------------------------------ checkpoints
    def _block_shapes(self, block: BlockInfo) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(local, global) shape of a block. A block cut along unsharded dims only (ASGO cuts the
        columns of a row-sharded matrix) has the global shape of the local one with full sharded dims;
        one cut across the shards is whole on its holder."""
        if self.cut_across(block):
            return tuple(block.shape), tuple(block.shape)
        loc = block.view(local(self._params[block.param_index]))  # type: ignore[arg-type]
        return tuple(loc.shape), tuple(block.shape)

    def _as_dtensor_like(self, block: BlockInfo) -> tuple[Any, Any]:
        p = self._params[block.param_index]
        return p.device_mesh, p.placements  # type: ignore[attr-defined]

    def gather_state(self, block: BlockInfo, state: dict[str, Any]) -> dict[str, Any]:
        """Collective: ``state`` with every parameter-like tensor replaced by the full tensor of the block
        (its own ``rows x rest`` matrix form kept). Call in block order on every rank."""
        from torch.distributed.tensor import DTensor

        if not self.placements[block.param_index].is_dtensor or self.cut_across(block):
            return state  # a block cut across the shards: its holder keeps its whole state
        loc_shape, glob_shape = self._block_shapes(block)
        mesh, placements = self._as_dtensor_like(block)
        out = dict(state)
        for key in sorted(k for k, t in state.items() if k in PARAM_LIKE_STATE_KEYS and isinstance(t, Tensor)):
            t = state[key]
            if t.numel() != math.prod(loc_shape):
                raise ValueError(f"state {key!r} of block {block.key} has shape {tuple(t.shape)}; "
                                 f"expected {loc_shape} (the block's local shard)")
            full = DTensor.from_local(t.reshape(loc_shape), mesh, placements, shape=torch.Size(glob_shape),
                                      stride=_contiguous_stride(glob_shape)).full_tensor()
            out[key] = full if tuple(t.shape) == loc_shape else full.reshape(glob_shape[0], -1)
        return out

    def shard_state(self, block: BlockInfo, state: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`gather_state`, without communication (every rank holds the full loaded
        state): this rank's piece of every parameter-like tensor."""
        from torch.distributed.tensor import distribute_tensor

        if not self.placements[block.param_index].is_dtensor or self.cut_across(block):
            return state  # a block cut across the shards: its whole state, for its holder
        _, glob_shape = self._block_shapes(block)
        mesh, placements = self._as_dtensor_like(block)
        out = dict(state)
        for key, t in state.items():
            if key not in PARAM_LIKE_STATE_KEYS or not isinstance(t, Tensor):
                continue
            if t.numel() != math.prod(glob_shape):
                raise ValueError(f"saved state {key!r} of block {block.key} has shape {tuple(t.shape)}; "
                                 f"expected {glob_shape} (the block of the full parameter)")
            piece = distribute_tensor(t.reshape(glob_shape), mesh, placements, src_data_rank=None).to_local()
            out[key] = (piece if tuple(t.shape) == glob_shape else piece.reshape(piece.shape[0], -1)).clone()
        return out


class FSDPGroups:
    """FSDP2's parameter groups (``fully_shard`` units) that hold some of an optimizer's DTensor parameters.

    A forward without backward (an evaluation between ``backward()`` and ``step()``, a closure that only
    returns the loss, SOAA's ``same_batch`` re-evaluation) leaves some groups unsharded: the root's (FSDP2
    never reshards the root after forward: ``fully_shard(model)`` alone, a root that holds the embeddings
    and the output layer, every unit when the root is not wrapped) and, with ``reshard_after_forward=False``
    or an int, every group. The next forward reads those unsharded copies, not what the optimizer wrote
    since (torch's AdamW too: 0.13 off one process in 4 steps). :meth:`reshard` frees them (FSDP2's own
    ``reshard()``, local to the rank, no collective; the same groups on every rank of a group's mesh, which
    all hold its parameters), so the next forward all-gathers what the optimizer holds.

    Found once (the groups live as long as their modules) through torch's internal registry of composable
    states, the one route from parameters to their ``fully_shard`` modules (``FSDPModule.reshard()`` is
    public, but an optimizer knows its parameters, not the modules). Where that registry or an FSDP2 state
    in it does not read as expected (another torch), :attr:`unreadable` says why and the optimizer warns.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.groups, self.unreadable = _fsdp_groups_of(params)

    def reshard(self) -> None:
        """Free every unsharded copy a forward without backward left (the same on every rank). A group in
        the middle of a forward or backward (a step from a backward hook) is left alone: autograd may still
        read its unsharded parameters."""
        for group in self.groups:
            if getattr(getattr(group, "_training_state", None), "name", "IDLE") == "IDLE":
                group.reshard()

    def compute_dtype(self) -> torch.dtype | None:
        """The coarsest dtype a forward computes in: the ``MixedPrecisionPolicy`` ``param_dtype`` (bf16: the
        loss is a bf16 model's, though the parameters are float32); None without."""
        dtypes = [getattr(getattr(g, "mp_policy", None), "param_dtype", None) for g in self.groups]
        return max((dt for dt in dtypes if isinstance(dt, torch.dtype) and dt.is_floating_point),
                   key=lambda dt: torch.finfo(dt).eps, default=None)

    def compute_eps(self) -> float:
        """The relative rounding of :meth:`compute_dtype` (0 without a ``MixedPrecisionPolicy``)."""
        dt = self.compute_dtype()
        return torch.finfo(dt).eps if dt is not None else 0.0


def _fsdp_param_groups() -> Iterator[Any]:
    """Every FSDP2 parameter group of the live ``fully_shard`` modules, once each, through torch's internal
    registry of composable states. Raises ``ImportError`` (no registry), ``AttributeError`` or ``TypeError``
    (an FSDP2 state that reads otherwise: another torch)."""
    from torch.distributed._composable_state import _module_state_mapping

    seen: set[int] = set()
    for ref in list(_module_state_mapping.values()):  # (weak: a module collected during the walk leaves it)
        state: Any = ref()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            if "FSDP" not in type(state).__name__:
                continue  # another composable API's state (replicate of DDP, checkpoint)
            groups = [state._fsdp_param_group]  # torch before several groups per state (AttributeError else)
        for group in groups:
            if group is not None and id(group) not in seen:
                seen.add(id(group))
                yield group


def _fsdp_groups_of(params: Sequence[Tensor]) -> tuple[list[Any], str | None]:
    """(the FSDP2 parameter groups holding some of ``params``, why FSDP2's states could not be read or None)."""
    wanted = {id(p) for p in params if is_dtensor(p)}
    if not wanted:
        return [], None
    found: list[Any] = []
    try:
        for group in _fsdp_param_groups():
            if any(id(fp.sharded_param) in wanted for fp in group.fsdp_params):
                if not callable(group.reshard):
                    return [], f"{type(group).__name__}.reshard is not a method"
                found.append(group)
    except ImportError as e:
        return [], f"no registry of composable states ({e})"
    except (AttributeError, TypeError) as e:  # torch's internals changed: say so rather than find nothing
        return [], f"an FSDP2 state reads differently ({type(e).__name__}: {e})"
    return found, None


def _averaged_dims(params: Sequence[Tensor]) -> dict[int, int]:
    """``id(p)`` -> the mesh dim over which FSDP2 averages ``p``'s gradient (HSDP's replicate dim: the first of
    its mesh, before any tensor-parallel dim), for each of ``params`` a ``fully_shard`` unit holds under HSDP.
    Empty where torch's states read otherwise (every ``Replicate`` dim then counts as one that may drift)."""
    wanted = {id(p) for p in params}
    found: dict[int, int] = {}
    try:
        for group in _fsdp_param_groups():
            for fp in group.fsdp_params:
                dim = getattr(fp.mesh_info, "replicate_mesh_dim", None)
                if id(fp.sharded_param) in wanted and isinstance(dim, int):
                    found[id(fp.sharded_param)] = dim
    except (ImportError, AttributeError, TypeError):
        return {}
    return found


def replicas_may_drift(params: Sequence[Tensor]) -> list[bool]:
    """Per DTensor parameter: whether its copies on the ranks that hold the same piece may drift by ulps. A
    ``Replicate`` dim over which FSDP2 averages the gradient (HSDP's) gives every copy the same bits; any other
    (a tensor-parallel ``Replicate`` weight, whose gradient each rank computes itself) may not."""
    averaged = _averaged_dims(params)
    from torch.distributed.tensor import Replicate

    return [any(isinstance(pl, Replicate) and p.device_mesh.size(i) > 1 and i != averaged.get(id(p))  # type: ignore[attr-defined]
                for i, pl in enumerate(p.placements))  # type: ignore[attr-defined]
            for p in params]


def fsdp_groups_on_meshes(groups: Sequence[Any]) -> list[Any]:
    """``groups`` and every other live FSDP2 parameter group on one of their meshes: the groups whose gradient
    reductions pair up with theirs (another optimizer's units of the same model). Only ``groups`` where
    torch's states read otherwise."""
    try:
        meshes = [g.mesh_info.mesh for g in groups]
        peers = [g for g in _fsdp_param_groups() if any(g.mesh_info.mesh == m for m in meshes)]
    except (ImportError, AttributeError, TypeError):
        return list(groups)
    ids = {id(g) for g in groups}
    return list(groups) + [g for g in peers if id(g) not in ids]


def fsdp2_unsharded_params() -> dict[int, str]:
    """``id`` -> name of every tensor a live ``fully_shard`` module holds as a parameter's unsharded form:
    ``FSDPParam._unsharded_param`` (made at the first all-gather, refilled by each one after it) and the
    ``_sharded_post_forward_param`` of ``reshard_after_forward=<int>``. A module that is not resharded (the root
    after a forward, any after ``set_reshard_after_backward(False)``, ``reshard_after_forward=False`` or
    ``model.unshard()``) has these in its ``_parameters``, so ``model.parameters()`` taken then gives them
    instead of the sharded DTensor parameters. No other tensor is one of these objects: plain, DDP, DTensor and
    FSDP2's sharded parameters never are. Empty without FSDP2 modules, and where torch's registry or its states
    read otherwise (another torch: nothing is detected then)."""
    if not dist.is_available():
        return {}
    found: dict[int, str] = {}
    try:
        for group in _fsdp_param_groups():
            for fsdp_param in group.fsdp_params:
                for attr in ("_unsharded_param", "_sharded_post_forward_param"):
                    copy = getattr(fsdp_param, attr, None)  # (the first only after the first all-gather)
                    if isinstance(copy, Tensor):
                        found[id(copy)] = str(getattr(fsdp_param, "_param_fqn", None) or "")
    except (ImportError, AttributeError, TypeError):
        return {}
    return found


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))
