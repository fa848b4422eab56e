"""Activation checkpointing: chosen decoder blocks keep only their input and recompute the rest.

Implements gradient checkpointing ("Training Deep Nets with Sublinear Memory Cost", Chen et al.,
2016) per block, as torchtitan applies it: "full" recomputes every block, "every:K" every K-th
(blocks K-1, 2K-1, ...), trading one more forward of those blocks for their activations.
"""

from __future__ import annotations

from torch import nn


def checkpointed_blocks(mode: str, n_layers: int) -> list[int]:
    """The indices of the blocks `mode` ("none", "full" or "every:K", as config validates)
    recomputes."""
    if mode == "none":
        return []
    every = 1 if mode == "full" else int(mode.split(":", 1)[1])
    return [i for i in range(n_layers) if (i + 1) % every == 0]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> list[int]:
    """Mark the blocks of `model.layers` that `mode` picks for recomputation; returns their
    indices. The blocks are flagged, not wrapped, so parameter names, state-dict keys and the
    per-block FSDP units stay exactly as without checkpointing (old checkpoints load unchanged);
    `Llama.forward` runs a flagged block under `torch.utils.checkpoint` while gradients are on."""
    chosen = checkpointed_blocks(mode, len(model.layers))
    for i, block in enumerate(model.layers):
        block.checkpointed = i in chosen
    return chosen
