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

Model FLOPs utilisation (MFU, PaLM's appendix B) divides the achieved rate of these FLOPs by the
device's dense peak; activation checkpointing's recomputation is not model FLOPs and is not counted.
"""

from __future__ import annotations

import torch
from torch import nn

from sltrain.parametrize.base import FactoredLinear


def format_flops(n: float) -> str:
    """12.3 MFLOP, 2.46 GFLOP."""
    return f"{n / 1e9:.2f} GFLOP" if n >= 1e9 else f"{n / 1e6:.1f} MFLOP"


def format_rate(n: float) -> str:
    """12.3 GFLOP/s, 412 TFLOP/s."""
    for scale, unit in ((1e12, "TFLOP/s"), (1e9, "GFLOP/s")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1e6:.3g} MFLOP/s"


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


# Dense peak tensor-core FLOP/s of one GPU from NVIDIA's datasheets (half the "with sparsity"
# figures): (bf16, tf32). Matched in order against torch.cuda.get_device_name, the first name that
# occurs in it winning: "H100 PCIe" before "H100" (SXM), "A100" before "A10", "L40S" before "L4".
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200 NVL", 835e12, 418e12),
    ("H200", 989e12, 495e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H100", 989e12, 495e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("A10", 125e12, 62.5e12),
)


def peak_for(name: str, precision: str, tf32: bool) -> tuple[float | None, str]:
    """(dense peak FLOP/s, what it is) of the GPU called `name` for the matmuls of `precision`
    (fp32, bf16-mixed or bf16; fp32 counts TF32's peak when `tf32` is on); (None, why not) for
    a GPU the table lacks or float32 matmuls without TF32."""
    for key, bf16, tf32_peak in PEAK_FLOPS:
        if key in name:
            if precision != "fp32":
                return bf16, f"{name} bf16 dense peak {format_rate(bf16)}"
            if tf32:
                return tf32_peak, f"{name} tf32 dense peak {format_rate(tf32_peak)}"
            return None, f"no MFU: {name} runs fp32 without TF32, which has no tensor-core peak"
    return None, f"no MFU: no peak FLOP/s known for {name} (sltrain.measure.flops.PEAK_FLOPS)"


def device_peak(device: torch.device, precision: str, tf32: bool) -> tuple[float | None, str]:
    """`peak_for` the GPU `device` is; no MFU on a CPU (its peak depends on cores and clocks)."""
    if device.type != "cuda":
        return None, f"no MFU on {device.type}: FLOP/s only"
    return peak_for(torch.cuda.get_device_name(device), precision, tf32)
