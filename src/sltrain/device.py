"""Where a command computes: the device a `--device` name means, the precision it trains in and
the autocast that precision runs under.

bf16 autocast over float32 weights on CUDA by default (mixed precision, Micikevicius et al.
2018); `--precision bf16` stores weights, gradients and states in bf16 as the papers' runs do.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sltrain.config import RunConfig
from sltrain.errors import UserError
from sltrain.model.llama import cast_parameters_


def resolve_device(name: str) -> torch.device:
    """`auto` (a GPU when there is one), `cpu` or `cuda[:N]` as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no GPU is available; use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32, bf16-mixed or bf16; `auto` is bf16-mixed on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return precision


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype weights, gradients and optimizer states are stored in under `precision`."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def cast_weights_(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """Store `model`'s floating parameters in the run's weight dtype. Buffers keep theirs: the
    sparse supports stay integer and the RoPE tables float32."""
    cast_parameters_(model.parameters(), weight_dtype(resolve_precision(cfg.train.precision, device)))
    return model


def enable_tf32(device: torch.device, precision: str) -> bool:
    """Let float32 matmuls and convolutions use TF32 tensor cores on CUDA under fp32 and
    bf16-mixed (10-bit mantissa products, float32 accumulation: what torchtitan and nanoGPT run);
    returns whether it did. Nothing changes on other devices, nor under bf16, whose matmuls are
    bf16 already. A process-wide switch: it stays on for the rest of the process."""
    if device.type != "cuda" or resolve_precision(precision, device) == "bf16":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def autocast_for(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast under bf16-mixed; none under fp32, nor under bf16, whose weights already
    are bf16."""
    if resolve_precision(cfg.train.precision, device) != "bf16-mixed":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
