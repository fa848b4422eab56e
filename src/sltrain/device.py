"""Where a command computes: the device a `--device` name means, and the autocast it runs under.

bf16 autocast on CUDA by default (the papers' setting), float32 elsewhere unless asked.
"""

from __future__ import annotations

import contextlib

import torch

from sltrain.config import RunConfig
from sltrain.errors import UserError


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


def autocast_for(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (and on CPU when asked), plain float32 otherwise."""
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
