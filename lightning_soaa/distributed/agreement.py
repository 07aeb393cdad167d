"""What every rank must agree on, and how the ranks find out together that they do not.

Two checks, both designed so that a disagreement ends in the **same** error on every rank (never a hang,
never a crash of one rank inside the collective library, never silent divergence):

* **At construction** (and when an optimizer joins a process group late, or a param group is added): one
  all-gather of a fixed-size int64 vector of digests, one per field (the lightning_soaa code the rank
  runs: version and a digest of its source files; optimizer class, parameter shapes/dtypes/order,
  parameter names, every group's hyperparameters and the optimizer's config, sharding options, and the
  block table as built: blocks and owners). The vector has the same length whatever the optimizer (and
  room for later versions' fields), so even ranks that built different optimizer classes meet in a
  collective of matching size; every rank then sees every rank's digests and raises the same error
  naming the fields that differ.
  Every rank of a W > 1 group takes part, whatever its ``shard`` value: the package's identity and then
  the sharding options are compared first, on every rank; the other fields only where the parameters are
  one replicated model (sharded, or DTensor shards). ``shard=False`` without DTensors (DeepSpeed ZeRO's
  per-rank partitions) may hold different shapes on every rank, so only those two are compared. Code
  patched at run time (a monkeypatched update formula) is not seen unless it changes the block table.
* **At every step**: a few values per rank ride in the step's single fp64 all-reduce, each rank writing
  only its own row of a ``[world, STEP_ROW]`` block and zeros elsewhere. A sum with zeros is exact, so
  after the reduction every rank holds every rank's row bit for bit: an error flag (an exception this
  rank raised before the collective), a digest of the hyperparameters, and, when gradients must be the
  same on every rank (``grad_reduction="none"``), a digest of the local gradients; the optimizer's step
  counter (``num_steps + skipped_steps``: a rank that loaded a checkpoint alone is at another step; a
  rank that skips one ``step()`` call or makes one twice is not seen here, since the steps pair up by
  their order and both sides count alike: it shows, with torch's own error, at the last collective one
  rank makes alone, as under DDP); and, at the first step after construction or ``load_state_dict`` with
  ``grad_reduction="mean"`` on sharded ranks, a flag and a digest of the parameters (replicas that
  were never made equal, e.g. initialised with another seed on every rank and no broadcast); the digest of
  what changed in place since the last step; and under HSDP the same two of the replicated DTensor shards,
  each compared with the lowest rank holding the same shard (not with rank 0, whose shard is another).

Nothing here keeps global state; the functions read an optimizer and return values or raise.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import numbers
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CONSTRUCTION_FIELDS",
    "CONSTRUCTION_WIDTH",
    "CONSTRUCTION_FAILED",
    "FAILED_FLAG_COLUMN",
    "package_identity",
    "source_digest",
    "table_text",
    "STEP_ROW",
    "GRAD_RTOL",
    "canonical",
    "construction_digests",
    "check_construction",
    "failed_flags",
    "hyperparameter_digest",
    "group_rest_text",
    "group_lr_text",
    "digest_group_texts",
    "group_values",
    "first_group_difference",
    "first_global_difference",
    "presence_digest",
    "first_presence_difference",
    "grad_digest",
    "grad_sq_tensor",
    "grad_sq_exact",
    "grad_scan_tensors",
    "grad_log_exact",
    "GRAD_LOG_SLOT",
    "MOVED_SLOT",
    "LOADED_SLOT",
    "SHARD_SLOT",
    "moved_digest",
    "param_digest",
    "param_sums",
    "instance_id",
    "RECORD_SLOTS",
    "ERROR_SLOT",
    "INSTANCE_SLOT",
    "OOM_FLAG",
    "error_flag",
    "peers_out_of_memory",
    "agreed_error",
    "record_size",
    "meeting_table",
    "meeting_rows",
    "other_instances",
    "step_row_values",
    "StepVerdict",
    "read_step_rows",
]

#: the fields of the construction digest, in vector order (the vector also carries two counts). The package's
#: identity comes first and is compared first, on every rank: two ranks running different lightning_soaa code
#: may differ in anything after it (a later version's block table, its update formula), and the source is
#: then the difference to name.
CONSTRUCTION_FIELDS = (
    "lightning_soaa source",
    "lightning_soaa version",
    "optimizer class",
    "parameter shapes, dtypes and device types (in order)",
    "parameter names (in order)",
    "hyperparameters (every param group and the optimizer's config)",
    "sharding options",
    "block table (blocks and their owners)",
)

#: int64 columns of a rank's row in the construction all-gather: the fields, the two counts, zeros, and last
#: the caller's count of optimizers built over the group. Fixed, with room to spare, so that a later
#: version with more fields still meets this one in an all-gather of equal size (gloo aborts on a size
#: mismatch; NCCL hangs) and both read the source digest in column 0 and refuse together.
CONSTRUCTION_WIDTH = 16

#: values per rank in the step's all-reduce: error flag, hyperparameter digest, Σ‖g‖², #gradients, the
#: step counter, the replica check's flag (1: this rank compares its parameters at this step), the
#: parameter digest, the optimizer instance's id (:func:`instance_id`) and Σ log2 ‖g_i‖² over the compared
#: gradients (:data:`GRAD_LOG_SLOT`), then the digest of the parameters changed in place since the optimizer last
#: wrote them (:data:`MOVED_SLOT`), and the digest of this rank's replicated DTensor shards (:data:`SHARD_SLOT`).
#: Last, whose state a rank loaded since its last step where that was another rank's (:data:`LOADED_SLOT`).
#: The same layout on every rank and at every step, whether or not a value is used.
STEP_ROW = 12

#: the step record's summed values (the non-finite flag and the count of ranks with a gradient first) are
#: padded to this many, so that the step's
#: all-reduce has the same size for every optimizer class: two optimizers stepped in different orders on
#: two ranks then meet in a call of equal size, and the instance ids say so (instead of gloo's size-mismatch
#: abort, or NCCL's hang)
RECORD_SLOTS = 9

#: where a rank's row holds the error flag and the optimizer instance's id. An optimizer whose step begins
#: with a collective of its own (EGN's batch agreement) sizes it :func:`record_size` and keeps these two
#: slots, so that it meets another optimizer's step record in a call of equal size and both read each
#: other's ids
ERROR_SLOT, INSTANCE_SLOT = 0, 7

#: where a rank's row holds Σ_i log2 ‖g_i‖² over its compared gradients (:func:`grad_scan_tensors`): each
#: parameter's gradient weighs the same whatever its scale. Σ‖g‖² alone is dominated by the largest
#: gradients, so one parameter whose gradient was not averaged (a layer unfrozen after DDP was built, whose
#: bucket DDP never reduces) passed unseen below GRAD_RTOL of the sum and was stepped from its owner's own
#: gradient (a scalar with 4e-9 of Σ‖g‖²: 4% of its movement off the one-process run in 4 steps, silently).
GRAD_LOG_SLOT = 8

#: where a rank's row holds :func:`moved_digest` of the parameters something other than the optimizer changed in
#: place since its last step (0: none). A replica's forward that writes its own parameters (nn.Embedding(max_norm=...)
#: renormalises the rows of this rank's batch) leaves the ranks with different weights, each block is then updated
#: from its owner's copy alone, and the run silently left the one-process run (AdamW: 1.6e-3 off at W = 2 in 4
#: steps); an in-place change made alike on every rank (clipping after the step) digests alike and passes. Which
#: parameter differs is found by comparing the whole parameters once a digest differs (the optimizer's
#: ``_replicas_differ``), so the row holds no index.
MOVED_SLOT = 9

#: where a rank's row holds the digest of its pieces of the DTensor parameters that have replicas (HSDP's
#: replicate dim: :mod:`~lightning_soaa.distributed.shard_replicas`): at a replica check (:func:`param_digest` of
#: the pieces), else :func:`moved_digest` of those changed in place since the last step (0: none). A piece is
#: compared with the lowest rank holding the same piece (``replica_of`` of :func:`read_step_rows`), not with rank
#: 0: shards differ across the shard dim by design. A replica written on one rank only (or started from other
#: weights) would otherwise train apart from its twin at every step, silently (FSDP2 averages their gradients).
SHARD_SLOT = 10

#: where a rank's row says that the ``shard=False`` state it loaded since its last step was saved by another rank
#: (:func:`~lightning_soaa.optim.saving_rank.loaded_slot`; 0: its own, or none recorded). Read only at the replica
#: check that such a load makes due: parameters that differ there are partitions, and another rank's state on
#: them is refused on every rank (:mod:`~lightning_soaa.optim.saving_rank`).
LOADED_SLOT = 11

#: the error slot's value of a rank whose error is an out of memory. Each rank writes only its own row, so the
#: summed table keeps it.
OOM_FLAG = 2.0

#: the error slot's values of the classes a rank raises when its peers raised one (the first that an error is
#: an instance of: a ValueError subclass counts as a ValueError); any other class: :func:`_class_flag`
_KNOWN_ERRORS: tuple[tuple[type[Exception], float], ...] = (
    (torch.OutOfMemoryError, OOM_FLAG), (ValueError, 3.0), (TypeError, 4.0), (RuntimeError, 5.0))
_OTHER_CLASS = 1 << 47  # set in the flag of any other class (its digest): never one of the values above


def _class_flag(cls: type[BaseException]) -> float:
    return float(_digest(f"{cls.__module__}.{cls.__qualname__}") | _OTHER_CLASS)  # exact in float64


def error_flag(error: BaseException | type[BaseException] | None) -> float:
    """The error slot's value for this rank's ``error`` (an exception or its class): 0 (none), the value of the
    first known class it is an instance of (:data:`OOM_FLAG` for an out of memory), else its class's digest.
    1 (what a rank that failed writes where it does not say how) is an error of unknown class."""
    if error is None:
        return 0.0
    cls = error if isinstance(error, type) else type(error)
    return next((flag for known, flag in _KNOWN_ERRORS if issubclass(cls, known)), None) or _class_flag(cls)


def peers_out_of_memory(what: str, ranks: Sequence[int]) -> torch.OutOfMemoryError:
    """What a rank raises when its peers ``ranks`` ran out of memory in an agreed part of the step: an out of
    memory too, so that a caller catching ``torch.OutOfMemoryError`` on every rank (to free memory or shrink
    the batch, and step again) takes the same branch on every rank. A rank raising another type was left out
    of the retry: its peers met its next collective (or its exit) from the retried step."""
    return torch.OutOfMemoryError(
        f"{what}: rank(s) {list(ranks)} ran out of memory (see that rank's traceback); the step was abandoned on "
        "every rank and nothing changed. Raised on this rank as an out of memory too: catch it on every rank "
        "(free memory or shrink the batch, then step again) to keep the ranks in step.")


def _flag_name(flag: float) -> str:
    known = next((cls for cls, f in _KNOWN_ERRORS if f == flag), None)
    if known is None:  # (a Ctrl+C held for the agreement: its rank raises it, the others an error naming it)
        return "KeyboardInterrupt" if flag == _class_flag(KeyboardInterrupt) else "an error"
    return "torch.OutOfMemoryError" if flag == OOM_FLAG else known.__name__


def agreed_error(what: str, flags: Sequence[float], own: BaseException | None,
                 where: str = "before the step's all-reduce") -> BaseException:
    """The exception this rank raises when some ranks failed in agreed work (``flags``: every rank's
    :func:`error_flag`, in rank order, from a reduced table; ``own``: this rank's error, or None). Every rank
    raises an instance of one class, so that a caller's ``except`` takes the same branch on every rank (one
    that catches an out of memory and steps again, alone, met its peers' exit or their next collective):

    * the failed ranks' errors are all of one known class (an out of memory; else a ValueError, TypeError or
      RuntimeError, subclasses included): that class, each failed rank raising its own error and the others
      one naming the failed ranks;
    * every rank failed, with errors of one other class: each rank its own;
    * otherwise (errors of different classes, or another class on some ranks): a RuntimeError naming each
      failed rank and its error's class, whose cause on a failed rank is its own error."""
    failed = [r for r, f in enumerate(flags) if f > 0]
    kinds = {flags[r] for r in failed}
    one = kinds.pop() if len(kinds) == 1 else None
    cls = next((c for c, f in _KNOWN_ERRORS if f == one), None)
    same = one is not None and (cls is not None or (one >= _OTHER_CLASS and len(failed) == len(flags)))
    if own is not None and same:  # (flag 1: a rank that did not say which class it raised)
        return own
    if cls is torch.OutOfMemoryError:
        return peers_out_of_memory(what, failed)
    names = ", ".join(f"rank {r}: {_flag_name(flags[r])}" for r in failed)
    mine = " (see that rank's traceback)"
    if own is not None:  # its first line (the whole error is the cause of this one)
        mine = f"; this rank's: {type(own).__name__}: {(str(own).strip().splitlines() or [''])[0][:300]}"
    return (cls or RuntimeError)(f"{what}: rank(s) {failed} raised an error {where}: {names}{mine}; the step was "
                                 "abandoned on every rank and nothing changed.")


def record_size(world: int) -> int:
    """Values in a step's first all-reduce at world size ``world``: the summed values, one row per rank and
    the stop vote's slot."""
    return RECORD_SLOTS + world * STEP_ROW + 1


def meeting_table(rank: int, world: int, instance: float, error: float = 0.0) -> tuple[list[float], int]:
    """A step's first all-reduce where it is not the record (EGN's agreements, the order check before an
    exchange, a join): :func:`record_size` zeros with this rank's error flag (:func:`error_flag`; True: 1, an
    error of unknown class) and ``instance`` in its row, and the row's offset (the caller fills the row's
    other slots)."""
    table = [0.0] * record_size(world)
    row = RECORD_SLOTS + rank * STEP_ROW
    table[row + ERROR_SLOT] = float(error)
    table[row + INSTANCE_SLOT] = float(instance)
    return table, row


def meeting_rows(reduced: Sequence[float], world: int) -> list[list[float]]:
    """Every rank's row of a reduced :func:`meeting_table`."""
    return [list(reduced[RECORD_SLOTS + r * STEP_ROW:RECORD_SLOTS + (r + 1) * STEP_ROW]) for r in range(world)]


def other_instances(rows: Sequence[Sequence[float]]) -> list[int]:
    """Ranks whose row holds another instance id than rank 0's (the verdict the record's rows give too)."""
    return [r for r in range(len(rows)) if rows[r][INSTANCE_SLOT] != rows[0][INSTANCE_SLOT]]

#: relative tolerance on Σ‖g‖² across ranks. Gradients averaged by DDP are bitwise equal on every rank
#: (the collective hands every rank the same bits), so an honest run differs by 0; the tolerance only
#: keeps a run on heterogeneous devices (different reduction kernels, last-bit differences) from a false
#: alarm. Different data on different ranks changes Σ‖g‖² at order 1.
GRAD_RTOL = 1e-6

#: absolute tolerance on :data:`GRAD_LOG_SLOT`'s sum, per compared gradient: a last-bit difference of a norm
#: moves its log2 by ~1e-7 (float32), a gradient that differs by its own scale (not averaged) by ~1
GRAD_LOG_ATOL = 1e-5

#: the squared norm a zero gradient's log2 is taken at (the smallest normal float64: log2 = -1022)
_LOG_FLOOR = 2.0 ** -1022

_MASK48 = (1 << 48) - 1  # 48-bit digests are exact in float64 (53-bit mantissa)


def presence_digest(present: Sequence[bool]) -> int:
    """A 48-bit digest of which parameters have a gradient (0 where none is listed: nothing to compare)."""
    if not present:
        return 0
    return int.from_bytes(hashlib.blake2b(bytes(present), digest_size=6).digest(), "big") & _MASK48


def first_presence_difference(by_rank: Sequence[Sequence[bool] | None], labels: Sequence[str]) -> str:
    """The first parameter that has a gradient on some ranks and not on others (ranks that sent None left
    out), as a sentence naming it by its label (``'name'`` or ``#index``); empty when every rank's pattern is
    the same."""
    sent = [(r, p) for r, p in enumerate(by_rank) if p is not None]
    for i, label in enumerate(labels):
        with_grad = [r for r, p in sent if i < len(p) and p[i]]
        if with_grad and len(with_grad) < len(sent):
            without = [r for r, _ in sent if r not in with_grad]
            return f"parameter {label} has a gradient on rank(s) {with_grad} and none on rank(s) {without}"
    return ""


def canonical(value: Any) -> str:
    """A deterministic, address-free text for hyperparameter values (same value -> same text on every
    rank and every run): floats by their exact hex, tensors by their values, objects by their type."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return repr(value)
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, Tensor):
        return f"tensor({canonical(value.detach().cpu().tolist())})"
    if isinstance(value, (list, tuple)):
        inner = ",".join(canonical(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        return "{" + ",".join(f"{canonical(k)}:{canonical(value[k])}" for k in sorted(value, key=repr)) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value).__name__ + canonical({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, numbers.Real):
        # NumPy float32 scalars, Fractions, ...: by value (their type name alone made lr=np.float32(0.01)
        # on one rank and np.float32(0.05) on another agree; the ranks then trained 0.1 off either run)
        return f"{type(value).__name__}:{float(value).hex()}"
    return type(value).__qualname__  # e.g. a callable: its identity cannot be compared across processes


_NOT_DIGESTED = ("params", "param_names", "lr")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & _MASK48


def group_rest_text(group: dict[str, Any]) -> str:
    """:func:`canonical` of a param group's hyperparameters other than ``lr`` (not its parameters)."""
    return canonical({k: v for k, v in group.items() if k not in _NOT_DIGESTED})


def group_lr_text(group: dict[str, Any]) -> str:
    """:func:`canonical` of a param group's ``lr`` ('-' when it has none)."""
    return canonical(group["lr"]) if "lr" in group else "-"


def group_values(param_groups: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Each group's hyperparameters (``lr`` too, not the parameters) as short readable texts: what ranks
    exchange, on the error path only, to name the value that differs (:func:`first_group_difference`)."""
    skip = ("params", "param_names")
    return [{str(k): _short_text(v) for k, v in g.items() if k not in skip} for g in param_groups]


def _short_text(value: Any) -> str:
    text = f"tensor({value.detach().cpu().tolist()})" if isinstance(value, Tensor) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def first_group_difference(by_rank: Sequence[Sequence[dict[str, str]]], ranks: Sequence[int]) -> str:
    """``": param_groups[i]['key'] is A on rank 0, B on rank r"`` for the first value (by group, then key
    name) in which one of ``ranks`` differs from rank 0 (:func:`group_values` of every rank); '' if none
    (then the digest's difference is elsewhere, e.g. EGN's damping)."""
    ref = by_rank[0]
    for r in ranks:
        other = by_rank[r]
        if len(other) != len(ref):
            return f": rank 0 has {len(ref)} param groups, rank {r} has {len(other)}"
        for i, (a, b) in enumerate(zip(ref, other)):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    return (f": param_groups[{i}][{key!r}] is {a.get(key, '(absent)')} on rank 0, "
                            f"{b.get(key, '(absent)')} on rank {r}")
    return ""


def first_global_difference(by_rank: Sequence[dict[str, Any]], ranks: Sequence[int]) -> str:
    """``": opt.key is A on rank 0, B on rank r"`` for the first optimizer-wide value (by name) in which one of
    ``ranks`` differs from rank 0 (each rank's ``{name: value}`` of the values set by hand on the optimizer
    itself, EGN's ``damping`` and ``alpha``); '' if none."""
    ref = by_rank[0]
    for r in ranks:
        other = by_rank[r]
        for key in sorted(set(ref) | set(other)):
            a, b = _short_text(ref[key]) if key in ref else "(absent)", _short_text(other[key]) if key in other \
                else "(absent)"
            if a != b:
                return f": opt.{key} is {a} on rank 0, {b} on rank {r}"
    return ""


def digest_group_texts(texts: Sequence[str]) -> int:
    """The digest of the groups' texts (each :func:`group_rest_text` + '#' + :func:`group_lr_text`)."""
    return _digest("|".join(texts))


def hyperparameter_digest(param_groups: Sequence[dict[str, Any]]) -> int:
    """A 48-bit digest of every group's hyperparameters (not the parameters themselves). ``lr`` has a text
    of its own so that a scheduler's new ``lr`` re-reads that value alone
    (:class:`~lightning_soaa.distributed.hyper_digest.HyperparameterDigest`)."""
    return digest_group_texts([group_rest_text(g) + "#" + group_lr_text(g) for g in param_groups])


#: the files whose content is the package's identity: its modules and the C source of SOAA's CPU kernels
#: (compiled from the installed copy at first use); both ship in the wheel
_SOURCE_SUFFIXES = (".py", ".c")


def source_digest(root: Path) -> int:
    """48 bits of the package's source under ``root``: every ``.py`` and ``.c`` file, by its path relative to
    ``root`` ('/'-separated, in sorted order) and its content (line endings read as '\\n').

    Ranks of a healthy job run the same code and so agree: an installed wheel and an editable install of the
    same commit hold the same files with the same bytes, wherever they live (``root`` itself is not digested,
    nor file times); compiled files (``__pycache__``, a built kernel) are not read, as they depend on the
    interpreter. Refused on purpose: a copy edited on one node only, even in a comment (a comment cannot be
    told from a change of the update formula without parsing every module), and a module left in the
    package directory of one node's checkout."""
    files = sorted((f.relative_to(root).as_posix(), f) for f in root.rglob("*")
                   if f.suffix in _SOURCE_SUFFIXES and "__pycache__" not in f.parts and f.is_file())
    h = hashlib.sha256()
    for rel, f in files:
        data = f.read_bytes().replace(b"\r\n", b"\n")
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return int.from_bytes(h.digest()[:8], "little") & _MASK48


@functools.cache
def package_identity() -> tuple[str, int]:
    """``(lightning_soaa.__version__, source_digest(its directory))`` of this process, computed once (about
    1 MiB read: a few ms at the first construction check)."""
    version = str(getattr(sys.modules.get(__name__.split(".")[0]), "__version__", "unknown"))
    return version, source_digest(Path(__file__).resolve().parent.parent)


def table_text(table: Any) -> str:
    """A text of a :class:`~lightning_soaa.distributed.blocks.BlockTable` as built: for every block its
    parameter, group, cut and owner. The owners only when sharded (unsharded, each rank owns every block and
    writes its own rank); '-' for no table."""
    if table is None:
        return "-"
    sharded = bool(table.shard)
    return f"{table.world_size},{sharded}:" + ";".join(
        f"{b.param_index},{b.group_index},{b.dim},{b.start},{b.stop},{b.owner if sharded else -1}"
        for b in table.blocks)


@functools.lru_cache(maxsize=4096)
def _param_text(shape: tuple[int, ...], dtype: torch.dtype, device_type: str) -> str:
    """:func:`canonical` of a parameter's ``(shape, dtype, device type)``, kept per signature: a model's
    layers repeat a few, and each add_param_group digests every parameter's (walked anew, 2 µs each)."""
    return canonical((shape, str(dtype), device_type))


def _list_text(texts: list[str]) -> str:
    """:func:`canonical` of a list whose items' texts are ``texts``."""
    return "[" + ",".join(texts) + "]"


def construction_digests(optimizer: Any, params: Sequence[Tensor], names: Sequence[str | None],
                         steps_before_join: int, full: bool = True, table: Any = None,
                         groups_digest: int | None = None) -> Tensor:
    """This rank's construction vector (int64, ``CONSTRUCTION_WIDTH - 1`` columns): one digest per
    :data:`CONSTRUCTION_FIELDS`, the number of parameters, the number of steps taken before joining the
    process group, then zeros.

    ``full``: whether the ranks compare every field (one replicated model) or only the package's identity
    and the sharding options (per-rank partitions); it is part of the sharding options' digest, so ranks
    that compare it equal also agree on whether to compare the rest. ``table``: the block table this rank
    built for ``params`` (cut and assigned by the package's code: ranks running different code, or one
    patched at run time, can agree on every other field and still meet in collectives of different sizes).
    ``groups_digest``: :func:`hyperparameter_digest` of the optimizer's param groups where the caller keeps it
    (the same number, with each unchanged group's text reused); None: computed here."""
    cls = type(optimizer)
    config = getattr(optimizer, "config", None) or getattr(optimizer, "cfg", None)
    version, source = package_identity()
    fields = [
        _digest(f"{cls.__module__}.{cls.__qualname__}"),
        # the device type too: ASGO costs (and so owns) a block by the root its device and dtype resolve to
        _digest(_list_text([_param_text(tuple(p.shape), p.dtype, p.device.type) for p in params])),
        _digest(_list_text([repr(n) if n is None or type(n) is str else canonical(n) for n in names])),
        _digest(canonical([hyperparameter_digest(optimizer.param_groups) if groups_digest is None else groups_digest,
                           config])),
        _digest(canonical([optimizer.sharding, bool(full)])),
        _digest(table_text(table)),
    ]
    row = [source, _digest(version)] + fields + [len(params), int(steps_before_join)]
    return torch.tensor(row + [0] * (CONSTRUCTION_WIDTH - 1 - len(row)), dtype=torch.int64)


#: the parameter-count column of a construction row whose rank's constructor raised before the check (it joins
#: the check to say so: lightning_soaa/optim/construction.py); a real count is >= 0
CONSTRUCTION_FAILED = -1
#: the column of a failed construction row that holds its error's :func:`error_flag` (after the field digests,
#: the parameter count and the step count; CONSTRUCTION_FAILED where the rank did not say)
FAILED_FLAG_COLUMN = len(CONSTRUCTION_FIELDS) + 2


def check_construction(optimizer: Any, everyone: Tensor | Sequence[Sequence[int]], full: bool = True,
                       stage: str | None = None, agreed: str | None = None) -> None:
    """Raise the same ``RuntimeError`` on every rank when the gathered construction vectors differ.

    ``everyone`` is the ``[world, CONSTRUCTION_WIDTH - 1]`` all-gather of :func:`construction_digests` (or its
    rows as host lists: read on the host, with no tensor op that could fail on one rank alone after the
    all-gather); every rank holds the same matrix, so every rank decides alike. A rank whose constructor raised
    is named first, then ranks running other lightning_soaa code, then the sharding options, compared on every
    rank; the other fields only when ``full`` (equal on every rank once the sharding options are: it is part of
    their digest). ``stage``: what a failed row's rank was doing, where not the constructor. ``agreed``: the
    step joining the process group (its name): a failed row's rank raised in a step, whose callers branch on
    the class (:func:`agreed_error`).
    """
    rows: list[list[int]] = everyone.tolist() if isinstance(everyone, Tensor) else [list(r) for r in everyone]
    name = type(optimizer).__name__
    nf = len(CONSTRUCTION_FIELDS)
    world = len(rows)
    failed = [r for r in range(world) if rows[r][nf] == CONSTRUCTION_FAILED]
    if failed and agreed is not None:
        raise agreed_error(agreed, failed_flags(rows), None, f"while {stage}")
    if failed and stage is not None:
        raise RuntimeError(
            f"{name}: {stage} raised on rank(s) {failed} (their own error says why; look for it in their output), "
            "so the optimizer is left as it was on every rank. A param group valid on some ranks only is the "
            "usual cause: every rank must pass the same groups.")
    if failed:
        raise RuntimeError(
            f"{name}: the constructor raised on rank(s) {failed} (their own error says why; look for it in their "
            "output), so the optimizer was built on no rank. An argument or parameter list valid on some ranks "
            "only is the usual cause: every rank must build the same optimizer.")
    _check_package(name, rows)
    ref = rows[0]
    si = CONSTRUCTION_FIELDS.index("sharding options")
    odd_sharding = [r for r in range(world) if rows[r][si] != ref[si]]
    if odd_sharding:
        raise RuntimeError(
            f"{name}: ranks disagree on the sharding options: rank(s) {odd_sharding} differ from rank 0 in "
            "shard, grad_reduction or whether the parameters are FSDP2 DTensors. Every rank must pass the "
            "same shard= and grad_reduction= (and the same kind of parameters).")
    if not full:
        return
    bad_fields = [CONSTRUCTION_FIELDS[i] for i in range(nf) if any(row[i] != ref[i] for row in rows)]
    counts = [row[nf] for row in rows]
    if any(c != ref[nf] for c in counts):
        bad_fields.insert(1, "number of parameters")
    if bad_fields:
        odd = [r for r in range(world) if rows[r][:nf + 1] != ref[:nf + 1]]
        params = ", ".join(f"rank {r}: {counts[r]} params" for r in range(world))
        table = ("" if bad_fields != [CONSTRUCTION_FIELDS[-1]] else
                 " The block table alone differs: the ranks cut or assign the blocks by different code (a "
                 "patched copy, or a class attribute such as default_max_block_numel or a cost constant set at "
                 "run time on some ranks only); every rank must run the same lightning_soaa, unpatched.")
        raise RuntimeError(
            f"{name}: ranks disagree on the parameter list or the optimizer ({params}); rank(s) {odd} differ "
            f"from rank 0 in: {'; '.join(bad_fields)}. Every rank must construct the same optimizer class "
            "over the same parameters (same names, shapes, dtypes, device types and order) with the same "
            f"hyperparameters.{table}"
        )
    stepped = [row[nf + 1] for row in rows]
    if max(stepped) > 0:
        ranks = [r for r in range(world) if stepped[r] > 0]
        raise RuntimeError(
            f"{name}: built before torch.distributed was initialized and already stepped "
            f"{max(stepped)} time(s) on rank(s) {ranks} as a single process; it cannot join the "
            f"{world}-rank group now (each rank's state may differ). Construct the optimizer "
            "after init_process_group (e.g. in LightningModule.configure_optimizers), or take no step "
            "before the process group exists."
        )


def failed_flags(rows: Sequence[Sequence[int]]) -> list[float]:
    """Every rank's error flag in gathered construction rows (1 where a failed rank did not say which)."""
    return [0.0 if row[len(CONSTRUCTION_FIELDS)] != CONSTRUCTION_FAILED else
            float(row[FAILED_FLAG_COLUMN]) if row[FAILED_FLAG_COLUMN] > 0 else 1.0 for row in rows]


def _check_package(name: str, rows: list[list[int]]) -> None:
    """Raise when some rank runs other lightning_soaa code than rank 0 (columns 0 and 1, which every version
    with a :data:`CONSTRUCTION_WIDTH` row keeps: the refusal reaches ranks of either version)."""
    world = len(rows)
    source, version = [row[0] for row in rows], [row[1] for row in rows]
    odd = [r for r in range(world) if source[r] != source[0] or version[r] != version[0]]
    if not odd:
        return
    what = ("a different version than rank 0" if any(version[r] != version[0] for r in odd)
            else "the same version as rank 0 but a different source (a patched or partly upgraded copy)")
    digests = ", ".join(f"rank {r}: {source[r]}" for r in range(world))
    raise RuntimeError(
        f"{name}: every rank must run the same lightning_soaa: rank(s) {odd} run {what} "
        f"(lightning_soaa source digests: {digests}). Ranks running different code may cut, assign or update "
        "the blocks differently (collectives of different sizes, or silently different training). Install "
        "the same lightning_soaa on every node; `python -c \"from lightning_soaa.distributed.agreement "
        "import package_identity as p; print(p())\"` prints a node's (version, source digest).")


def grad_digest(grads: Sequence[Tensor]) -> tuple[float, bool]:
    """``(Σ‖g‖², all finite)`` over ``grads``: one read of every gradient (``_foreach_norm``)."""
    if not grads:
        return 0.0, True
    sq = float(grad_sq_tensor(grads).cpu())
    return sq, math.isfinite(sq)


def _grad_sq_norms(grads: Sequence[Tensor]) -> Tensor:
    """``[‖g‖²]`` per gradient of ``grads`` (at least one), float64, on their device: one read of every
    gradient (``_foreach_norm`` in the gradients' own dtype), no host sync."""
    norms = torch._foreach_norm(list(grads))
    if all(n.dtype == norms[0].dtype for n in norms):
        stacked = torch.stack(norms).to(torch.float64)  # the same values as converting each norm first
    else:
        stacked = torch.stack([n.to(torch.float64) for n in norms])
    return stacked.square()


def grad_sq_tensor(grads: Sequence[Tensor]) -> Tensor:
    """``Σ‖g‖²`` over ``grads`` (at least one) as a 0-d float64 tensor on their device, without a host
    sync: the caller copies it to the host together with its other values."""
    return _grad_sq_norms(grads).sum()


def grad_scan_tensors(grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(Σ‖g‖², Σ log2 ‖g‖²)`` over ``grads`` (at least one) as 0-d float64 tensors on their device, from
    one read of every gradient (the norms :func:`grad_sq_tensor` sums): the second weighs every gradient alike,
    whatever its scale (:data:`GRAD_LOG_SLOT`); a zero gradient counts at ``2**-1022``."""
    sq = _grad_sq_norms(grads)
    return sq.sum(), sq.clamp_min(_LOG_FLOOR).log2().sum()


def grad_log_exact(grads: Sequence[Tensor]) -> float:
    """:func:`grad_scan_tensors`' Σ log2 ‖g‖² with every norm accumulated in float64, like
    :func:`grad_sq_exact` (where a norm in the gradient's own dtype overflowed)."""
    if not grads:
        return 0.0
    real = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
    sq = torch.stack(torch._foreach_norm(real, dtype=torch.float64)).square()
    return float(sq.clamp_min(_LOG_FLOOR).log2().sum().cpu())


def grad_sq_exact(grads: Sequence[Tensor]) -> float:
    """``Σ‖g‖²`` with every norm accumulated in float64 (complex gradients as their real views): finite
    iff every entry is, also where :func:`grad_sq_tensor`'s norms in the gradients' own dtype overflow.
    Several times slower on large tensors, so only for a sum that came out non-finite."""
    if not grads:
        return 0.0
    real = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
    return float(torch.stack(torch._foreach_norm(real, dtype=torch.float64)).square().sum().cpu())


def param_digest(params: Sequence[Tensor]) -> int:
    """A 48-bit digest of the parameters' bits (:func:`param_sums`), the same on every rank that holds the same
    values."""
    return _digest(canonical(param_sums(params)))


def param_sums(params: Sequence[Tensor]) -> list[int]:
    """Each parameter's sum of its elements' mixed bits, the same on every rank that holds the same values.

    Each element's bits (a complex one's real and imaginary parts) are read as an integer, mixed with its
    position (:func:`_mixed_sum`) and summed modulo 2^64: integer addition is exact and associative, so the
    sum does not depend on the reduction order (thread count, device kernels), as a float sum would. One
    read of every parameter: made only at the steps that check the replicas."""
    sums = []
    for p in params:
        x = p.detach().reshape(-1)
        if x.is_complex():  # its real and imaginary parts' bits (a cast to int64 drops the imaginary part)
            x = torch.view_as_real(x.resolve_conj()).reshape(-1)  # a conjugate view keeps its bit until resolved
        x = x.resolve_neg()  # a negative-bit view (a conjugate's .imag) cannot be viewed as integers
        if x.is_floating_point() and x.dtype != torch.float64:
            ints = {2: torch.int16, 4: torch.int32}.get(x.element_size())
            x = x.view(ints) if ints is not None else x.to(torch.float64).view(torch.int64)
        elif x.dtype == torch.float64:
            x = x.view(torch.int64)
        sums.append(_mixed_sum(x))
    return torch.stack([s.to(sums[0].device) for s in sums]).tolist() if sums else []  # one host copy


def moved_digest(indices: Sequence[int], params: Sequence[Tensor]) -> int:
    """A 48-bit digest of which parameters (``indices``) changed in place and of their values
    (:func:`param_digest`): equal on ranks that changed the same parameters to the same bits."""
    return _digest(canonical([list(indices), param_digest(params)])) or 1  # 0 says "none changed"


#: splitmix64's constants as int64 (torch's int64 products wrap around, as the mix needs)
_GOLDEN, _MIX1, _MIX2 = (c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
#: elements mixed at a time on the CPU: the mix makes ~10 passes over its int64 chunk, and a chunk whose two
#: temporaries (1 MiB) stay in a core's cache made them 4x faster than 2^24 (10M float32, one thread: 47-52 ms
#: against 193-208 ms); the sum is exact modulo 2^64, so every chunking gives the same bits
_DIGEST_CHUNK = 1 << 16
#: on an accelerator, where each pass is a kernel launch: bounds the temporaries to a few times 128 MiB
_DEVICE_DIGEST_CHUNK = 1 << 24


def _mixed_sum(bits: Tensor) -> Tensor:
    """``Σ_i mix(bits_i, i)`` modulo 2^64 of a 1-D integer tensor. A plain sum of the bits missed changes
    that cancel in it: sign flips of an even number of float64 elements (each adds 2^63), a conjugate's
    imaginary parts, values swapped between positions (a square matrix against its transpose)."""
    total = torch.zeros((), dtype=torch.int64, device=bits.device)
    chunk = _DIGEST_CHUNK if bits.device.type == "cpu" else _DEVICE_DIGEST_CHUNK
    for start in range(0, bits.numel(), chunk):
        h = bits[start:start + chunk].to(torch.int64, copy=True)  # mixed in place below
        idx = torch.arange(start, start + h.numel(), dtype=torch.int64, device=h.device).mul_(_GOLDEN)
        h.bitwise_xor_(idx).mul_(_MIX1)
        h.bitwise_xor_(torch.bitwise_right_shift(h, 31, out=idx)).mul_(_MIX2)
        total += h.bitwise_xor_(torch.bitwise_right_shift(h, 29, out=idx)).sum(dtype=torch.int64)
    return total


def instance_id(construction: Tensor, ordinal: int) -> int:
    """A 48-bit id of one optimizer, equal on every rank: its construction vector (class, parameters,
    names, hyperparameters, options; equal on every rank once checked) and its ordinal among the optimizers
    built over the same process group (in the same order on every rank: each construction is a
    collective). Two optimizers over parameters of equal shapes, without names, differ by the ordinal."""
    return _digest(canonical([construction.tolist(), int(ordinal)])) & _MASK48


def step_row_values(rank: int, world: int, *, error: float, hyper: int, grad_sq: float, grad_count: int,
                    steps: int = 0, replica_check: bool = False, shards_only: bool = False, params_digest: int = 0,
                    instance: int = 0, grad_logs: float = 0.0, moved: int = 0, shards: int = 0,
                    loaded: float = 0.0) -> list[float]:
    """The ``[world * STEP_ROW]`` block of the step's all-reduce as floats: this rank's row, zeros elsewhere.
    ``error``: a bool, or :func:`error_flag`'s value; ``moved``: the :data:`MOVED_SLOT` digest; ``shards``:
    :data:`SHARD_SLOT`'s digest; ``loaded``: :data:`LOADED_SLOT`'s value; ``shards_only``: a replica check that
    digests HSDP's shards but not the replicas (``params_digest`` 0: FSDP2's plain replicas under ``"none"``), so
    their in-place changes are still judged (the check's flag is 2, not 1)."""
    out = [0.0] * (world * STEP_ROW)
    # A non-finite Σ‖g‖² is reported through the non-finite flag; zero keeps the row comparable.
    out[rank * STEP_ROW:(rank + 1) * STEP_ROW] = [float(error), float(hyper),
                                                  grad_sq if math.isfinite(grad_sq) else 0.0, float(grad_count),
                                                  float(steps), (2.0 if shards_only else 1.0) if replica_check else 0.0,
                                                  float(params_digest), float(instance),
                                                  grad_logs if math.isfinite(grad_logs) else 0.0,
                                                  float(moved), float(shards), float(loaded)]
    return out


@dataclasses.dataclass(frozen=True)
class StepVerdict:
    """What the gathered rows say (identical on every rank)."""

    error_ranks: list[int]
    hyper_ranks: list[int]  # ranks whose hyperparameters differ from rank 0's
    grad_ranks: list[int]  # ranks whose gradients differ from rank 0's (only when compared)
    #: every rank's step counter when they are not all equal (else empty)
    step_counts: list[int] = dataclasses.field(default_factory=list)
    #: ranks whose replica-check flag differs from rank 0's: the check is due on some ranks only (an
    #: optimizer loaded on some ranks only)
    check_ranks: list[int] = dataclasses.field(default_factory=list)
    param_ranks: list[int] = dataclasses.field(default_factory=list)  # parameters differ from rank 0's
    replicated: bool = False  # every rank made a digest and all are equal
    #: with counted gradients (``grad_reduction="mean"``): the ranks without any gradient where some rank
    #: has one, else empty
    gradless_ranks: list[int] = dataclasses.field(default_factory=list)
    #: ranks in the step of another optimizer than rank 0 (optimizers stepped in different orders)
    instance_ranks: list[int] = dataclasses.field(default_factory=list)
    #: every rank's error flag (:func:`error_flag`), in rank order: what :func:`agreed_error` reads
    error_flags: list[float] = dataclasses.field(default_factory=list)
    #: ranks whose parameters changed in place since the last step differ from rank 0's (:data:`MOVED_SLOT`)
    moved_ranks: list[int] = dataclasses.field(default_factory=list)
    #: ``(rank, LOADED_SLOT value)`` of each rank that loaded another rank's ``shard=False`` state since its last step
    foreign_loads: list[tuple[int, float]] = dataclasses.field(default_factory=list)


def read_step_rows(rows: Tensor | Sequence[float], world: int, compare_grads: bool,
                   count_grads: bool = False, replica_of: Sequence[int] | None = None) -> StepVerdict:
    """Decode the reduced ``[world * STEP_ROW]`` block (bit-identical on every rank). ``count_grads``: the
    rows' gradient counts are each rank's number of parameters with a gradient (not compared gradients).
    ``replica_of``: per rank, the rank whose DTensor pieces it must hold too (:data:`SHARD_SLOT`; None: none
    compared); a rank whose piece differs is named in ``param_ranks`` (a replica check) or ``moved_ranks``."""
    flat = rows.tolist() if isinstance(rows, Tensor) else list(rows)
    m = [flat[r * STEP_ROW:(r + 1) * STEP_ROW] for r in range(world)]
    errors = [r for r in range(world) if m[r][ERROR_SLOT] > 0]
    hyper = [r for r in range(world) if m[r][1] != m[0][1]]
    grads: list[int] = []
    if compare_grads:
        ref_sq, ref_n, ref_logs = m[0][2], m[0][3], m[0][GRAD_LOG_SLOT]
        for r in range(1, world):
            sq, n, logs = m[r][2], m[r][3], m[r][GRAD_LOG_SLOT]
            if (n != ref_n or abs(sq - ref_sq) > GRAD_RTOL * max(abs(sq), abs(ref_sq))
                    or abs(logs - ref_logs) > GRAD_LOG_ATOL * max(n, 1.0)):
                grads.append(r)
    steps = [int(m[r][4]) for r in range(world)]
    checks = [r for r in range(world) if m[r][5] != m[0][5]]
    # digests are compared only when every rank made one (a rank whose check is not due wrote 0)
    digests = not checks and m[0][5] > 0
    # (a piece compared with its replica's: at a replica check its digest, else that of its in-place changes)
    shards = [] if replica_of is None else [r for r in range(world) if m[r][SHARD_SLOT] != m[replica_of[r]][SHARD_SLOT]]
    params = sorted({r for r in range(world) if m[r][6] != m[0][6]}.union(shards)) if digests else []
    counts = [m[r][3] for r in range(world)]
    gradless = [r for r in range(world) if counts[r] == 0] if count_grads and max(counts) > 0 else []
    instances = other_instances(m)
    # a step whose replica check compared every rank's whole parameters equal has nothing left to judge: the
    # parameters changed in place since the last step are equal too (a rank that changed one, was refused, and
    # was then re-synced by a broadcast of p.data, which moves no version counter, would be refused for ever)
    # (not where the check left the replicas out (flag 2): their in-place changes are judged as at any step)
    whole_equal = digests and not params and m[0][5] == 1.0
    moved = [] if whole_equal else sorted({r for r in range(world) if m[r][MOVED_SLOT] != m[0][MOVED_SLOT]}
                                          .union([] if digests else shards))
    return StepVerdict(errors, hyper, grads, steps if len(set(steps)) > 1 else [], checks, params,
                       replicated=whole_equal and world > 1, gradless_ranks=gradless,
                       instance_ranks=instances,
                       error_flags=[m[r][ERROR_SLOT] for r in range(world)],
                       moved_ranks=moved,
                       foreign_loads=[(r, m[r][LOADED_SLOT]) for r in range(world) if m[r][LOADED_SLOT] > 0])
