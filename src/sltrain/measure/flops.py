"""FLOPs per token of a model's forward and training step, counted layer by layer from its shapes.

The "6 N" accounting of "Scaling Laws for Neural Language Models" (Kaplan et al., 2020) and
PaLM's (Chowdhery et al., 2022), with each re-parameterised linear counting its own matmuls.

What is counted: 2 FLOPs per multiply-add of every matmul; work a layer does once per forward or
backward call (SLTrain composing W = s B A) is spread over the call's tokens. Attention adds
Q K^T and the weighted sum of V, 4 seq_len d per token and layer, over the whole square (causal
masking not subtracted, as PaLM counts). A backward costs twice a forward (the gradients of the
input and of each weight are one matmul each) unless a layer says otherwise (frozen weights,
recomputation). Element-wise work (norms, softmax, RoPE, the SwiGLU gate, residual adds) is the
same for every method and not counted; CoLA counts its σ (the method's own, sltrain.parametrize.cola).
"""

from __future__ import annotations

from torch import nn

from sltrain.parametrize.base import FactoredLinear


def format_flops(n: float) -> str:
    """12.3 MFLOP, 2.46 GFLOP."""
    return f"{n / 1e9:.2f} GFLOP" if n >= 1e9 else f"{n / 1e6:.1f} MFLOP"


def linear_flops(m: nn.Module, tokens_per_batch: int) -> tuple[float, float]:
    """(forward, backward) FLOPs per token of one linear layer."""
    if isinstance(m, FactoredLinear):
        return m.flops_per_token(tokens_per_batch), m.backward_flops_per_token(tokens_per_batch)
    dense = 2.0 * m.in_features * m.out_features
    return dense, dense * (1 + m.weight.requires_grad)  # dY W, and dY^T X for a trained W


def model_flops(model: nn.Module, seq_len: int, batch_size: int) -> dict[str, float]:
    """FLOPs per token of `model` (any device, meta included) for micro-batches of `batch_size`
    sequences of `seq_len` tokens: "forward", "backward", "train" (their sum) and, of the
    forward, "linears" and "attention"."""
    tokens = batch_size * seq_len
    forward = backward = 0.0
    for m in model.modules():
        if isinstance(m, (FactoredLinear, nn.Linear)):
            f, b = linear_flops(m, tokens)
            forward, backward = forward + f, backward + b
    cfg = model.cfg
    attention = 4.0 * seq_len * cfg.n_heads * cfg.head_dim * cfg.n_layers
    return {"forward": forward + attention, "backward": backward + 2 * attention,
            "train": forward + backward + 3 * attention, "linears": forward, "attention": attention}
