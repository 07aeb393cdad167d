"""torch's optimizer state-dict hooks, run around a state dict built or loaded another way.

``torch.optim.Optimizer.state_dict``/``load_state_dict`` run the hooks registered with
``register_state_dict_pre_hook``/``post_hook`` and ``register_load_state_dict_pre_hook``/``post_hook``;
optimizers that override those methods (every lightning_soaa optimizer, the DeepSpeed client wrappers)
run them here, the same way: a post hook (state) or pre hook (load) may return a replacement, a load pre
hook gets a copy of the caller's dict (torch's ``state_dict.copy()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["hooked_load", "hooked_state_dict"]


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
