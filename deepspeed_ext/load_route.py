"""What ``engine.load_checkpoint`` is asked for, settled on every rank before DeepSpeed reads anything: the tag
every rank loads (``latest`` exists on global rank 0's node only under node-local storage), and ZeRO-3's loads of
the weights only (DeepSpeed's own route for them loaded nothing, or another tag's weights)."""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from deepspeed_ext.client import StateLayoutError

__all__ = ["agreed_tag", "load_zero3_weights", "zero3_weights_only"]


def _read_latest(load_dir: str) -> str | None:
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as fh:
        return fh.read().strip()


def agreed_tag(engine: Any, load_dir: str, tag: Any) -> Any:
    """The tag every rank loads: ``tag`` when given, else the one ``latest`` names, agreed among the ranks.
    DeepSpeed writes ``latest`` on global rank 0 only; under node-local storage the other nodes' ranks found none,
    so DeepSpeed's load warned and returned there without loading while rank 0 loaded (ranks trained on from
    different weights and steps, or hung in the load's collectives). Ranks that see no ``latest`` now take the tag
    the others' names; copies naming different tags are refused on every rank. None when no rank sees one
    (DeepSpeed's warning on every rank alike). A universal checkpoint's ``latest_universal`` is DeepSpeed's."""
    from deepspeed_ext.engine import agreed_checks

    if tag is not None or engine.load_universal_checkpoint():
        return tag
    seen = agreed_checks(lambda: _read_latest(load_dir))
    named = sorted({t for t in seen if t is not None})
    if len(named) > 1:
        by_rank = ", ".join(f"rank {r}: {t!r}" for r, t in enumerate(seen))
        raise StateLayoutError(
            f"The ranks' copies of {os.path.join(load_dir, 'latest')!r} name different checkpoints ({by_rank}; "
            "None: no 'latest' there), so the ranks would load different checkpoints. Nothing was loaded. Load "
            f"one tag on every rank: engine.load_checkpoint(load_dir, tag=...) (one of {named}).")
    return named[0] if named else None


def zero3_weights_only(engine: Any, given: dict[str, Any]) -> bool:
    """Whether this load takes a ZeRO-3 checkpoint's weights without its optimizer state (``load_module_only`` or
    ``load_optimizer_states=False``), which DeepSpeed reads from every rank's optimizer file: ZeRO-3's model-states
    files hold empty partitions. Not with MoE layers or a universal checkpoint (DeepSpeed's own routes)."""
    weights_only = given.get("load_module_only", False) or not given.get("load_optimizer_states", True)
    return bool(weights_only and engine.zero_optimization_partition_weights() and not engine.has_moe_layers
                and not engine.load_universal_checkpoint())


#: how to take a ZeRO-3 checkpoint's weights at any data-parallel size
_Z3_WEIGHTS_REMEDY = (
    "Load the weights into the module before deepspeed_ext.initialize instead, at any data-parallel size: "
    "model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(load_dir, tag)) (deepspeed.utils.zero_to_fp32; "
    "every rank reads every rank's optimizer file, so on shared storage or a gathered copy). Nothing was loaded.")


def _check_zero3_weights_files(engine: Any, folder: str) -> None:
    """Refuse, on this rank, a ZeRO-3 weights-only load DeepSpeed cannot do here: DeepSpeed opens this rank's own
    model-states file (absent when the run has more data-parallel ranks than the save: the new rank raised a bare
    AssertionError alone while the others went into the load), then gathers the weights from every saved rank's
    optimizer file (missing ones: node-local storage). Frozen parameters at another (smaller) data-parallel size:
    DeepSpeed's load copies this rank's saved fragment of each over its own partition, of another size there (a
    bare RuntimeError after the trainable weights were loaded and before the fp32 masters were)."""
    import torch.distributed as dist

    mp = f"mp_rank_{int(engine.checkpoint_mp_rank):02d}"
    rank, mine = int(engine.global_rank), int(engine.dp_world_size)
    models = glob.glob(os.path.join(glob.escape(folder), f"zero_pp_rank_*_{mp}_model_states.pt"))
    saved, frozen = _dp_size_of(models[0]) if models else (None, [])
    own = os.path.join(folder, f"zero_pp_rank_{dist.get_rank(group=engine.optimizer.dp_process_group)}_{mp}"
                               "_model_states.pt")
    sizes = (f"; it was saved on {saved} data-parallel rank(s), this run has {mine}" if saved is not None else
             f"; this run has {mine} data-parallel rank(s)")
    if not os.path.isfile(own):
        raise StateLayoutError(
            f"Rank {rank} cannot load the weights of the ZeRO-3 checkpoint {folder!r}: it has no "
            f"{os.path.basename(own)!r}, which DeepSpeed's load opens on this rank also for the weights only"
            f"{sizes}. " + _Z3_WEIGHTS_REMEDY)
    if frozen and saved is not None and saved != mine:
        raise StateLayoutError(
            f"Rank {rank} cannot load the weights of the ZeRO-3 checkpoint {folder!r} at another data-parallel size: "
            f"it holds frozen parameters ({', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}), which "
            f"DeepSpeed's load copies from this rank's saved partition of them{sizes}. " + _Z3_WEIGHTS_REMEDY)
    files = glob.glob(os.path.join(glob.escape(folder), f"*zero_pp_rank_*_{mp}_optim_states.pt"))
    have = {int(m.group(1)) for f in files if (m := re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)))}
    lacking = [r for r in range(saved or 0) if r not in have]
    if lacking:
        raise StateLayoutError(
            f"Rank {rank} cannot load the weights of the ZeRO-3 checkpoint {folder!r}: they are partitioned across "
            f"every saved rank's optimizer file, and this rank's copy of the folder lacks those of data-parallel "
            f"rank(s) {lacking} (node-local storage?){sizes}. " + _Z3_WEIGHTS_REMEDY)


def _dp_size_of(path: str) -> tuple[int | None, list[str]]:
    """The data-parallel size a ZeRO-3 model-states file was saved at, and the names of its frozen parameters."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - an unreadable file: DeepSpeed's load names it
        return None, []
    if not isinstance(state, dict):
        return None, []
    size, shapes = state.get("dp_world_size"), state.get("frozen_param_shapes")
    return (size if isinstance(size, int) else None), ([str(n) for n in shapes] if isinstance(shapes, dict) else [])


@contextlib.contextmanager
def _weights_of_tag(tag: Any) -> Iterator[None]:
    """DeepSpeed's ZeRO-3 weights-only load gathers the weights with ``get_fp32_state_dict_from_zero_checkpoint(
    load_dir)``, without the tag: it took the weights of the checkpoint ``latest`` names (another save's,
    silently), or failed without ``latest``. For the load's length, the tag asked for is passed on."""
    import deepspeed.runtime.engine as ds_engine

    gather = ds_engine.get_fp32_state_dict_from_zero_checkpoint

    def of_tag(checkpoint_dir: str, tag_: Any = None, *args: Any, **kwargs: Any) -> Any:
        return gather(checkpoint_dir, tag if tag_ is None else tag_, *args, **kwargs)

    ds_engine.get_fp32_state_dict_from_zero_checkpoint = of_tag
    try:
        yield
    finally:
        ds_engine.get_fp32_state_dict_from_zero_checkpoint = gather


def load_zero3_weights(engine: Any, load: Callable[..., Any], given: dict[str, Any]) -> Any:
    """A ZeRO-3 weights-only load (:func:`zero3_weights_only`; ``given["tag"]`` agreed by :func:`agreed_tag`):
    refused on every rank when DeepSpeed cannot do it on some rank, else DeepSpeed's route that gathers the
    weights (``load_optimizer_states=False``) for the tag asked for. ``load_module_only=True`` alone took DeepSpeed's
    other route, which loads the model-states files' empty partitions: the engine kept its own weights, silently."""
    from deepspeed_ext.engine import agreed_checks

    tag = given.get("tag")
    if tag is None:  # no rank sees 'latest': DeepSpeed warns and loads nothing, on every rank
        return load(**given)
    agreed_checks(lambda: _check_zero3_weights_files(engine, os.path.join(given["load_dir"], str(tag))))
    with _weights_of_tag(tag):
        path, client_state = load(**{**given, "load_optimizer_states": False})
    if given.get("load_optimizer_states", True) and isinstance(client_state, dict):
        client_state.pop("optimizer", None)  # as DeepSpeed returns it for load_module_only alone
    return path, client_state
