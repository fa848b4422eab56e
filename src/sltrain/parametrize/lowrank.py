"""The low-rank layer: W = B @ A trained from scratch, both factors random.

The "Low-rank" baseline of "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection" (Zhao et al., 2024) and of the SLTrain paper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sltrain.parametrize.base import FactoredLinear, RankOptions
from sltrain.registry import METHODS


class LowRankLinear(FactoredLinear):
    """A bias-free linear layer whose weight is B @ A (A: rank x in, B: out x rank)."""

    refactorable = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.A.is_meta:
            self.init_weights(0.0)

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """Both factors uniform with bound 1/sqrt(fan_in), in place (`std` is unused): neither is
        zero, so B @ A starts at full rank-r signal with entries of std ~ 1 / (3 sqrt(in))."""
        self.A.uniform_(-1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features),
                        generator=generator)
        self.B.uniform_(-1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank), generator=generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, **_: object) -> LowRankLinear:
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return self.B @ self.A

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.A, self.B

    def flops_per_token(self, tokens_per_batch: int) -> float:
        return 2.0 * self.rank * (self.in_features + self.out_features)  # (x A^T) B^T

    def saved_bytes(self, tokens: int, compute_size: int, autocast: bool) -> int:
        """x A^T (rank values a token), which the second matmul keeps; under autocast the bf16
        copies of A and B."""
        copies = 2 * self.rank * (self.in_features + self.out_features) if autocast else 0
        return tokens * self.rank * compute_size + copies

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


METHODS.register("lowrank", LowRankLinear, options=RankOptions, doc="W = B·A trained from scratch")
