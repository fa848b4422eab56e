"""torch.compile of each decoder block (`train.compile`), as torchtitan compiles each block, and
of the loss on the logits.

"PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode Transformation and Graph
Compilation" (Ansel et al., ASPLOS 2024): TorchDynamo captures a block's forward (and, through
AOTAutograd, its backward) as one graph, and Inductor emits fused kernels for it (C++/OpenMP on
CPU, Triton on CUDA). Every block has the same code, so one compilation serves them all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._dynamo
from torch import nn

# torch.compile's backend for train.compile. The tests sweep every parameterisation under
# "aot_eager" (the same captured forward and backward graphs, run by eager kernels: no C++ build)
# and run Inductor itself once.
BACKEND = "inductor"


def compile_blocks(model: nn.Module, backend: str | None = None, fullgraph: bool = True) -> int:
    """Compile the forward of every block of `model.layers` in place (with `backend`, default
    BACKEND); returns how many.

    The block's `forward` is compiled, not its `__call__` (what `Module.compile` compiles), so
    the hooks on a block (FSDP2's all-gathers, the health taps) run outside the graph, as
    torchtitan's compiled block sits inside its FSDP unit; and as an attribute of the block, not
    a wrapper module, so parameter names and state-dict keys stay the eager model's (no
    `_orig_mod.`): checkpoints load into a compiled or an eager model alike. Call it after
    activation checkpointing has flagged its blocks (each block's recomputation is then part of
    its graph) and before the blocks are sharded (torchtitan's order: checkpointing, compile,
    FSDP). `fullgraph` makes a graph break inside a block an error instead of a silent slowdown.
    """
    blocks = list(model.layers)
    # Blocks that differ in a constant (the depth scale of layernorm_scaling, Post-LN in Mix-LN's
    # first blocks, checkpointed or not) each get their own graph of the shared code; the eight
    # dynamo keeps by default would send deeper models back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                4 * len(blocks))
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend or BACKEND,
                                      fullgraph=fullgraph)
    return len(blocks)


def compile_loss(fn: Callable[..., torch.Tensor], backend: str | None = None) -> Callable[..., torch.Tensor]:
    """`fn(logits, targets, reduction, **options)` compiled. Inductor fuses the float32 cast,
    log-softmax and target gather over the (tokens, vocab) logits, and the backward's softmax -
    onehot, into fewer passes than eager's kernels make, without eager's zero-filled gradient of
    the logits' size (the largest tensors of a small model's step: 4096 x 8192 floats at
    llama-cpu; docs/results/throughput.md measures it). The built-in losses compile as one graph
    each (the tests check); a plugin's loss that breaks the graph still runs, partly eager."""
    return torch.compile(fn, backend=backend or BACKEND)
