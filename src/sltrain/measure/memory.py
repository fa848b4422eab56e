"""Bytes of training state (weights, gradients, optimizer states, sparse indices) and peaks.

`estimate_memory` works from a meta-device model without allocating it; `measure_memory` sums
the tensors a live model and optimizer actually hold. Tests keep the two equal.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sltrain.parametrize.sltrain import SparseLowRankLinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Optimizer state per trainable element (in the parameters' dtype) and per parameter tensor
# (in bytes): AdamW keeps exp_avg and exp_avg_sq, plus a float32 scalar step per tensor.
OPTIMIZER_STATE = {"adamw": (2, 4)}


@dataclass
class MemoryBreakdown:
    weights: int
    gradients: int
    optimizer_states: int
    sparse_indices: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.sparse_indices

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _index_bytes(model: nn.Module) -> int:
    return sum(_bytes(m.support) for m in model.modules() if isinstance(m, SparseLowRankLinear))


def estimate_memory(
    model: nn.Module, dtype: torch.dtype = torch.float32, optimizer: str = "adamw"
) -> MemoryBreakdown:
    """Training-state bytes of `model` (any device, meta included) stored in `dtype`."""
    size = torch.empty((), dtype=dtype).element_size()
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    per_element, per_tensor = OPTIMIZER_STATE[optimizer]
    return MemoryBreakdown(
        weights=sum(p.numel() for p in params) * size,
        gradients=sum(p.numel() for p in trainable) * size,
        optimizer_states=sum(p.numel() for p in trainable) * size * per_element
        + len(trainable) * per_tensor,
        sparse_indices=_index_bytes(model),
    )


def measure_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> MemoryBreakdown:
    """Bytes the live tensors hold; gradients are counted as allocated during a step."""
    params = list(model.parameters())
    state = sum(
        _bytes(v)
        for per_param in optimizer.state.values()
        for v in per_param.values()
        if isinstance(v, torch.Tensor)
    )
    return MemoryBreakdown(
        weights=sum(_bytes(p) for p in params),
        gradients=sum(_bytes(p) for p in params if p.requires_grad),
        optimizer_states=state,
        sparse_indices=_index_bytes(model),
    )


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The peak memory of this process and what it measures."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "cpu_peak_rss"
