"""What every re-parameterised linear layer shares: a dense weight it can be folded into.

Subclasses define `in_features`, `out_features` and `dense_weight()`; `merged()` follows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class FactoredLinear(nn.Module, ABC):
    in_features: int
    out_features: int

    @abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer applies."""

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A bias-free nn.Linear with the same forward as this layer."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=False,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        return linear
