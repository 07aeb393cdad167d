"""``add_param_group`` on a DeepSpeed client optimizer after it was built: refused on every rank.

The client runs an inner lightning_soaa optimizer built from the groups handed to ``deepspeed_ext.initialize``;
torch's ``add_param_group`` appended the group to the client alone, the inner optimizer never saw it and its
parameters never moved (no error, steps counted). At ZeRO 1-3 DeepSpeed's own optimizer (``engine.optimizer``)
has no ``add_param_group`` either.
"""

from __future__ import annotations

from typing import Any

__all__ = ["refuse_added_group"]


def refuse_added_group(client: Any, inner: Any) -> None:
    """Raise the refusal of a group added to ``client`` (which runs ``inner``, None before its first step),
    on every rank together where ``inner`` can meet its peers: called on some ranks only while the others
    went on to their step, the refusing rank raised alone and the others waited in the step (a hang); the
    inner optimizer's add_param_group meeting makes them all raise (the stepping ranks naming it)."""
    error = ValueError(
        f"{type(client).__name__}.add_param_group: a group cannot be added after the client optimizer was "
        "built: the optimizer it runs was built from the param groups given to deepspeed_ext.initialize and "
        "would never step the added group's parameters (DeepSpeed's ZeRO optimizers have no add_param_group "
        "either). Pass every param group to deepspeed_ext.initialize. Nothing changed.")
    agree = getattr(inner, "_agree_on_added_group", None)
    if agree is not None and inner.comm.world_size > 1 and getattr(inner, "_table", None) is not None:
        try:
            agree(error, False)
        except RuntimeError as met:
            raise error from met
    raise error
