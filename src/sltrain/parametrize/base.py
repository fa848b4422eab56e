"""What every re-parameterised linear layer shares: a dense weight it can be folded into.

Subclasses define `in_features`, `out_features` and `dense_weight()`; `merged()` follows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from pydantic import Field
from torch import nn

from sltrain.registry import Options


# Options the parameterisations share, declared once (an option several entries declare must be
# declared identically). None means "the model preset's value".
class RankOptions(Options):
    rank: int | None = Field(None, gt=0, description="rank r of the B @ A factors (default: the preset's)")


class ScaledRankOptions(RankOptions):
    lora_alpha: float | None = Field(None, gt=0, description="scale s = lora_alpha / rank of B @ A "
                                     "(default: the preset's)")


class DensityOptions(Options):
    density: float | None = Field(None, gt=0, le=1, alias="sp_ratio",
                                  description="fraction of each weight's entries in the sparse part "
                                  "(default: the preset's)")


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
