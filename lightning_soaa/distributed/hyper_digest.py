"""The step's hyperparameter digest (:func:`agreement.hyperparameter_digest`) at the cost of identity checks.

Every W > 1 step sends a digest of every param group's hyperparameters, so that ranks whose values differ
raise together. Computed afresh it costs a :func:`agreement.canonical` walk of every value and a hash of the
text: with 50 groups (layer-wise lr decay) ~440 µs a step, plus ~160 µs for the exact key that decided when
to reuse it. Here each group's text is kept with the value objects it was made from; a group whose values
are the same objects as at the last step reuses its text, and a group where only ``lr`` is a new object (an
LR scheduler's every step) re-reads ``lr`` alone. Only immutable values are trusted by identity (floats,
ints, bools, strings, None and tuples of them, nested too): a list, a tensor or any other object may change
in place, so a group holding one is read again at every step, as before. The digest is the same number
:func:`agreement.hyperparameter_digest` gives, whatever was reused.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

from lightning_soaa.distributed.agreement import digest_group_texts, group_lr_text, group_rest_text

__all__ = ["HyperparameterDigest"]

_PLAIN = (float, int, bool, str, type(None))
_SKIPPED = ("params", "param_names")  # not digested; the lists may change in place (add_param_group)


def _immutable(v: Any) -> bool:
    if type(v) in _PLAIN:
        return True
    return type(v) is tuple and all(_immutable(x) for x in v)  # nested too (ASGO's fused_parts pairs)


class _Seen(NamedTuple):
    group: dict[str, Any]
    keys: tuple[str, ...]
    values: tuple[Any, ...]
    rest: str | None  # None: not trusted by identity (read again at every step)
    lr: str | None
    text: str


class HyperparameterDigest:
    """``digest(param_groups)`` = :func:`agreement.hyperparameter_digest`, reusing what did not change."""

    def __init__(self) -> None:
        self._seen: list[_Seen | None] = []
        self._last: tuple[list[str], int] = ([], 0)  # the texts hashed last and their digest

    def __call__(self, param_groups: Sequence[dict[str, Any]]) -> int:
        seen = self._seen
        if len(seen) != len(param_groups):  # (a group added or removed: each entry checks its group's identity)
            del seen[len(param_groups):]
            seen.extend([None] * (len(param_groups) - len(seen)))
        texts = []
        for i, group in enumerate(param_groups):
            entry = self._group(group, seen[i])
            seen[i] = entry
            texts.append(entry.text)
        if texts != self._last[0]:  # the same text objects when nothing changed: compared by identity
            self._last = (texts, digest_group_texts(texts))
        return self._last[1]

    @staticmethod
    def _group(group: dict[str, Any], last: _Seen | None) -> _Seen:
        values = tuple(group.values())
        if (last is not None and last.group is group and last.rest is not None and last.lr is not None
                and len(values) == len(last.values) and all(map(operator.is_, values, last.values))
                and tuple(group) == last.keys):
            return last  # nothing changed (the common case: C-level checks only)
        keys = tuple(group)
        rest = lr = None
        if last is not None and last.group is group and last.keys == keys:
            changed = [k for k, a, b in zip(keys, values, last.values) if a is not b and k not in _SKIPPED]
            rest = last.rest if all(k == "lr" for k in changed) else None
            lr = last.lr if "lr" not in changed else None
            if rest is not None and lr is not None:
                return last._replace(values=values)
        if rest is None:
            trusted = all(_immutable(v) for k, v in group.items() if k not in _SKIPPED and k != "lr")
            text = group_rest_text(group)
            rest = text if trusted else None
        else:
            text = rest
        lr_text = lr if lr is not None else group_lr_text(group)
        trusted_lr = "lr" not in group or _immutable(group["lr"])
        return _Seen(group, keys, values, rest, lr_text if trusted_lr else None, text + "#" + lr_text)
