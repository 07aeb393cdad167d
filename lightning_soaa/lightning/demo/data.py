"""Offline datasets as LightningDataModules (nothing is downloaded)."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["DigitsDataModule", "TopicsDataModule", "topics_text", "topics_vocab", "CharWindows"]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn ``load_digits``: 64 pixel features scaled to [0, 1], 10 classes.

    Args:
        batch_size: per-process batch size (the global batch is ``batch_size * devices``).
        val_fraction: share of the 1797 images held out for validation (a fixed, seeded split).
        seed: the split's seed.
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size={batch_size!r}. Must be an integer >= 1.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"Invalid val_fraction={val_fraction!r}. Must be in (0.0, 1.0).")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # the examples extra brings it; the lightning extra alone does not
            raise ImportError("The digits demo data needs scikit-learn: pip install scikit-learn (or "
                              "pip install -e '.[examples]' in a clone of lightning-soaa).") from e

        x, y = load_digits(return_X_y=True)
        x = torch.as_tensor(x, dtype=torch.float32) / 16.0
        y = torch.as_tensor(y, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(self.val_fraction * len(x)))
        val, train = perm[:n_val], perm[n_val:]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=256)


@functools.lru_cache(maxsize=1)
def topics_text() -> str:
    """The standard library's pydoc topic texts, joined in sorted-key order (deterministic)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=1)
def topics_vocab() -> str:
    """The sorted distinct characters of :func:`topics_text` (103 characters)."""
    return "".join(sorted(set(topics_text())))


class CharWindows(Dataset):
    """Non-overlapping windows of ``context`` characters; the target is the next character."""

    def __init__(self, ids: torch.Tensor, context: int) -> None:
        self.ids = ids
        self.context = context
        self.n = (len(ids) - 1) // context

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.context
        chunk = self.ids[s:s + self.context + 1]
        return chunk[:-1], chunk[1:]


class TopicsDataModule(pl.LightningDataModule):
    """Character-level language modelling on ``pydoc_data.topics``.

    Args:
        context: characters per training window.
        batch_size: per-process batch size.
        val_fraction: the last share of the text, held out for validation.
        max_val_windows: cap on validation windows (keeps validation cheap).
    """

    def __init__(self, context: int = 64, batch_size: int = 32, val_fraction: float = 0.1,
                 max_val_windows: int = 256) -> None:
        super().__init__()
        if context < 1 or batch_size < 1 or max_val_windows < 1:
            raise ValueError(
                f"Invalid context={context!r}, batch_size={batch_size!r} or "
                f"max_val_windows={max_val_windows!r}. "
                "Each must be an integer >= 1."
            )
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"Invalid val_fraction={val_fraction!r}. Must be in (0.0, 1.0).")
        self.context = context
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_val_windows = max_val_windows
        self.vocab_size = len(topics_vocab())
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        text, vocab = topics_text(), topics_vocab()
        table = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([table[c] for c in text], dtype=torch.long)
        split = int(len(ids) * (1.0 - self.val_fraction))
        self.train_set = CharWindows(ids[:split], self.context)
        val = CharWindows(ids[split:], self.context)
        self.val_set = torch.utils.data.Subset(val, range(min(len(val), self.max_val_windows)))

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=64)
