"""Small LightningModules for the offline datasets; no ``configure_optimizers`` on purpose."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsMLP", "CharTransformer", "ClassifierSteps"]


class ClassifierSteps(pl.LightningModule):
    """Shared steps: cross-entropy, accuracy, ``train_loss``/``val_loss``/``val_acc`` logged.

    ``training_step`` returns ``loss`` plus the correct/total counts, so callbacks can aggregate exact
    training accuracy across ranks.
    """

    def _logits_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        logits, y = self._logits_targets(batch)
        loss = F.cross_entropy(logits, y)
        correct = (logits.detach().argmax(-1) == y).sum()
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=y.numel())
        return {"loss": loss, "correct": correct, "count": torch.tensor(y.numel())}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits, y = self._logits_targets(batch)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log("val_loss", loss, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=y.numel())
        self.log("val_acc", acc, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=y.numel())


class DigitsMLP(ClassifierSteps):
    """A tanh MLP for 8x8 digits: 64 -> hidden... -> 10.

    Args:
        hidden: widths of the hidden layers.
        in_features, num_classes: input and output sizes.
    """

    def __init__(self, hidden: tuple[int, ...] = (128, 128), in_features: int = 64,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        sizes = (in_features, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _Block(nn.Module):
    """Pre-norm causal self-attention + MLP block (written out so every weight is a plain Linear)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(ClassifierSteps):
    """A small GPT-style character model.

    Args:
        vocab_size: number of symbols (103 for ``pydoc_data.topics``).
        context: maximum sequence length (positional embeddings).
        d_model, n_heads, n_layers: width, attention heads, blocks.
    """

    def __init__(self, vocab_size: int = 103, context: int = 64, d_model: int = 64, n_heads: int = 4,
                 n_layers: int = 2) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"Invalid n_heads={n_heads!r}. Must divide d_model={d_model}.")
        self.save_hyperparameters()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))
