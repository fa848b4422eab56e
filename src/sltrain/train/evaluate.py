"""Validation loss and perplexity over a fixed, ordered set of held-out blocks."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from sltrain.data.packing import Blocks


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(
    model: nn.Module, blocks: Blocks, batch_size: int, max_batches: int, device: torch.device,
    autocast: AbstractContextManager,
) -> dict[str, float]:
    """Token-weighted mean loss over the first `max_batches * batch_size` blocks (all if fewer)."""
    was_training = model.training
    model.eval()
    n = min(len(blocks), max_batches * batch_size)
    total_loss, total_tokens = 0.0, 0
    for start in range(0, n, batch_size):
        x, y = blocks.batch(range(start, min(n, start + batch_size)))
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x)
        total_loss += lm_loss(logits, y, reduction="sum").item()
        total_tokens += y.numel()
    model.train(was_training)
    loss = total_loss / total_tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": total_tokens}
