"""Language-model loss: per-token cross-entropy, and the validation loss and perplexity of a
model over a fixed, ordered set of held-out blocks (what training, `eval` and `soup` report)."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from sltrain.data.packing import Blocks
from sltrain.model.llama import Llama
from sltrain.train.distributed import World, unwrap
from sltrain.train.losses import cross_entropy, head_loss


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


def plain_head(model: nn.Module) -> nn.Linear | None:
    """`model`'s lm_head when the chunked losses can take its hidden states and head weight
    instead of its logits (our decoder with a dense, bias-free head), else None."""
    model = unwrap(model)
    head = getattr(model, "lm_head", None)
    if isinstance(model, Llama) and type(head) is nn.Linear and head.bias is None:
        return head
    return None


def token_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 autocast: AbstractContextManager, chunk_tokens: int = 0) -> torch.Tensor:
    """Per-token cross-entropy (flat) of `model` on inputs `x`, targets `y`: with `chunk_tokens`
    from the final hidden states, `chunk_tokens` logits rows at a time (`losses.head_loss`)."""
    head = plain_head(model) if chunk_tokens else None
    with autocast:
        if head is None:
            return lm_loss(model(x), y, reduction="none")
        hidden = model(x, return_hidden=True)
        # The weight read after the forward: FSDP2 has gathered it there.
        return head_loss(cross_entropy, hidden, head.weight, y, "none", chunk_tokens)


@torch.no_grad()
def evaluate(
    model: nn.Module, blocks: Blocks, batch_size: int, max_batches: int, device: torch.device,
    autocast: AbstractContextManager, world: World | None = None, chunk_tokens: int = 0,
) -> dict[str, float]:
    """Token-weighted mean loss over the first `max_batches * batch_size` blocks (all if fewer);
    `chunk_tokens` > 0 never forms more logits rows than that at once (`token_losses`).

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
    total_loss, total_tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, len(padded), per_rank):
        idx = padded[start : start + per_rank]
        counted = min(len(idx), max(0, len(mine) - start))
        x, y = blocks.batch(idx)
        x, y = x.to(device), y.to(device)
        # A padded batch counts only this rank's own blocks.
        rows = token_losses(model, x, y, autocast, chunk_tokens).view(len(idx), -1)
        total_loss += rows[:counted].sum().double()  # read once, after the loop
        total_tokens += counted * y.shape[1]
    total_loss = total_loss.item()
    if world.active:
        total_loss, tokens = world.sum([total_loss, float(total_tokens)])
        total_tokens = int(tokens)
    model.train(was_training)
    loss = total_loss / total_tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": total_tokens}
