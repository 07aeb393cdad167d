"""Checkpoints as earlier versions wrote them."""

from __future__ import annotations

import json
from typing import Any

from lightning_soaa.distributed.checkpoint import FORMAT_KEY

#: what :func:`lightning_soaa.distributed.checkpoint.group_record` adds to the metadata's copy
_RECORD = ("group_keys", "group_options")


def unrecorded(sd: dict[str, Any]) -> dict[str, Any]:
    """Our consolidated ``sd`` without the record of its groups (``checkpoint.group_record``, in the metadata's
    JSON copy in ``param_groups[0]``), as a version before it wrote it (a new dict; ``sd`` is not changed): the
    options the record keeps (ASGO's ``adamw_indices``, ``fused_parts``) are then those of a checkpoint saved
    without them."""
    groups = [dict(g) for g in sd["param_groups"]]
    if groups and isinstance(groups[0].get(FORMAT_KEY), str):
        meta = {k: v for k, v in json.loads(groups[0][FORMAT_KEY]).items() if k not in _RECORD}
        groups[0][FORMAT_KEY] = json.dumps(meta)
    top = sd.get(FORMAT_KEY)  # (none there: kept as an earlier version wrote it)
    return {**sd, "param_groups": groups,
            **({FORMAT_KEY: {k: v for k, v in top.items() if k not in _RECORD}} if isinstance(top, dict) else {})}
