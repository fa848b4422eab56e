"""Language-model loss: per-token cross-entropy, and the validation loss and perplexity of a
model over a fixed, ordered set of held-out blocks (what training, `eval` and `soup` report)."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from sltrain.data.packing import Blocks
from sltrain.train.distributed import World


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(
    model: nn.Module, blocks: Blocks, batch_size: int, max_batches: int, device: torch.device,
    autocast: AbstractContextManager, world: World | None = None,
) -> dict[str, float]:
    """Token-weighted mean loss over the first `max_batches * batch_size` blocks (all if fewer).

    Under torchrun each rank takes every `world.size`-th block and the sums are reduced; every
    rank runs the same number of forward passes (FSDP gathers weights in each), padding with a
    block that is not counted.
    """
    was_training = model.training
    model.eval()
    world = world or World()
    n = min(len(blocks), max_batches * batch_size)
    mine = list(range(world.rank, n, world.size))  # all n blocks, in order, in one process
    padded = mine + [0] * (-(-n // world.size) - len(mine))
    per_rank = max(1, batch_size // world.size)
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(padded), per_rank):
        idx = padded[start : start + per_rank]
        counted = min(len(idx), max(0, len(mine) - start))
        x, y = blocks.batch(idx)
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x)
        if counted == len(idx):
            total_loss += lm_loss(logits, y, reduction="sum").item()
        else:  # a padded batch: count only this rank's own blocks
            rows = lm_loss(logits, y, reduction="none").view(len(idx), -1).sum(1)
            total_loss += rows[:counted].sum().item()
        total_tokens += counted * y.shape[1]
    if world.active:
        total_loss, tokens = world.sum([total_loss, float(total_tokens)])
        total_tokens = int(tokens)
    model.train(was_training)
    loss = total_loss / total_tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": total_tokens}
