"""torch's optimizer state-dict hooks, run around a state dict built or loaded another way.

``torch.optim.Optimizer.state_dict``/``load_state_dict`` run the hooks registered with
``register_state_dict_pre_hook``/``post_hook`` and ``register_load_state_dict_pre_hook``/``post_hook``;
optimizers that override those methods (every lightning_soaa optimizer, the DeepSpeed client wrappers)
run them here, the same way: a post hook (state) or pre hook (load) may return a replacement, a load pre
hook gets a copy of the caller's dict (torch's ``state_dict.copy()``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lightning_soaa.distributed.checkpoint import FORMAT_KEY, group_meta_copy, holds_state

__all__ = ["hooked_load", "hooked_state_dict", "keep_run_state"]

log = logging.getLogger(__name__)


def hooked_state_dict(opt: Any, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    sd = build()
    if opt._optimizer_state_dict_post_hooks:  # a hook may edit in place: not a dict the optimizer caches
        sd = {**sd, "param_groups": [dict(g) for g in sd["param_groups"]]}
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        out = post_hook(opt, sd)
        if out is not None:
            sd = out
    return sd


def hooked_load(opt: Any, state_dict: Any, load: Callable[[Any], None]) -> None:
    if isinstance(state_dict, dict):
        state_dict = state_dict.copy()
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        out = pre_hook(opt, state_dict)
        if out is not None:
            state_dict = out
    load(state_dict)
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def _global_of(sd: Any) -> dict[str, Any] | None:
    """The optimizer-wide state of ``sd``: its metadata's, or (a state torch's tools rebuilt keeps only
    ``state`` and ``param_groups``) the JSON copy's in ``param_groups[0]``."""
    meta = sd.get(FORMAT_KEY) if isinstance(sd, dict) else None
    if meta is None:
        meta = group_meta_copy(sd)
    glob = meta.get("global") if isinstance(meta, dict) else None
    return glob if isinstance(glob, dict) else None


def _steps_of(glob: dict[str, Any]) -> Any:
    return glob.get("num_steps", 0), glob.get("skipped_steps", 0)


def keep_run_state(given: Any, final: Any) -> Any:
    """The state to load after the pre hooks turned ``given`` (the caller's) into ``final``.

    torch's recipe for loading by ``param_names`` (a load pre hook that starts from
    ``optimizer.state_dict()`` and copies each parameter's state from the checkpoint by name) keeps the
    *optimizer-wide* state of the optimizer it runs on: torch's optimizers have none, ours keep the step
    counts, SOAA's trust region and EGN's damping there. Loaded as it is, a stepped run's per-parameter
    state would continue with a never-stepped optimizer's trust region/damping (4e-2 and 7e-2 off the
    uninterrupted run after 3 steps). When a hook returned such a state (per-parameter state, but the
    optimizer-wide state of an optimizer that never stepped, not the caller's) and the caller's
    checkpoint has stepped, its optimizer-wide state is the one loaded. A hook that returns a fresh state
    (no per-parameter state: "do not load") is left as it is."""
    glob, source = _global_of(final), _global_of(given)
    if (glob is None or source is None or glob is source or not isinstance(final.get("state"), dict)
            or FORMAT_KEY not in final):
        return final
    # a fresh optimizer's state dict shows zeros for DCP (optim/dcp_plain.py): no state
    stepped_blocks = any(isinstance(st, dict) and any(holds_state(blk) for blk in st.values())
                         for st in final["state"].values())
    if not stepped_blocks or _steps_of(glob) != (0, 0) or _steps_of(source) == (0, 0):
        return final
    log.info("load_state_dict: a load pre hook rebuilt the state from a never-stepped optimizer's; loading the "
             "checkpoint's optimizer-wide state (step counts, trust region, damping) with it")
    return {**final, FORMAT_KEY: {**final[FORMAT_KEY], "global": source}}
