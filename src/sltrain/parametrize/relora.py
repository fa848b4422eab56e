"""The ReLoRA layer: a frozen dense weight plus a trainable low-rank update s * B @ A, merged every cycle.

Implements "ReLoRA: High-Rank Training Through Low-Rank Updates" (Lialin et al., ICLR 2024).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from sltrain.parametrize.base import FactoredLinear, ScaledRankOptions
from sltrain.registry import METHODS


class ReLoRALinear(FactoredLinear):
    """A bias-free linear layer whose weight is W + s * B @ A (A: rank x in, B: out x rank).

    W is frozen while the factors train; `merge_and_reinit_` folds s * B @ A into W and restarts
    the factors, so that the sum of many rank-r updates can reach full rank. During the full-rank
    warm start (`set_warm_start(True)`) W trains and the factors are frozen instead.
    """

    has_cycles = True  # every optimizer.reset_every steps: merge_and_reinit_
    cycle_event = "relora_merge"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        lora_alpha: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.lora_alpha = rank, lora_alpha
        self.scaling = lora_alpha / rank
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.reset_factors()

    @torch.no_grad()
    def reset_factors(self, generator: torch.Generator | None = None) -> None:
        """LoRA's init: A kaiming-uniform (bound 1/sqrt(in)), B zero, so a fresh update adds
        nothing. A is drawn from `generator`, or from the global RNG."""
        if self.A.is_meta:
            return
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.A, -bound, bound, generator=generator)
        nn.init.zeros_(self.B)

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """W ~ Normal(0, std) as a dense linear's init, drawn into the parameter itself (ReLoRA's
        W is dense by definition, allocated once), and the factors as `reset_factors`."""
        self.weight.normal_(0.0, std, generator=generator)
        self.reset_factors(generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, lora_alpha: float, **_: object) -> ReLoRALinear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, lora_alpha,
                    device=w.device, dtype=w.dtype)
        if not w.is_meta:
            with torch.no_grad():
                layer.weight.copy_(w)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.scaling * F.linear(F.linear(x, self.A), self.B)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return torch.addmm(self.weight, self.B, self.A, alpha=self.scaling)

    @torch.no_grad()
    def merge_and_reinit_(self, generator: torch.Generator | None = None) -> None:
        """Fold s * B @ A into W and restart the factors (A from `generator`, or the global RNG),
        keeping the same Parameter objects (so optimizer state keyed by them stays valid) and the
        same forward."""
        self.weight.addmm_(self.B, self.A, alpha=self.scaling)
        self.reset_factors(generator)

    def end_cycle_(self, generator: torch.Generator | None = None) -> list[nn.Parameter]:
        """A ReLoRA reset: merge and restart the factors; their moments describe the old ones."""
        self.merge_and_reinit_(generator)
        return [self.A, self.B]

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.A, self.B

    def flops_per_token(self, tokens_per_batch: int) -> float:
        dense, low = self.in_features * self.out_features, self.rank * (self.in_features + self.out_features)
        return 2.0 * (dense + low)

    def backward_flops_per_token(self, tokens_per_batch: int) -> float:
        """The input's gradient through both paths, and the weight gradients of what trains: the
        factors (outside the warm start) or W (during it)."""
        dense, low = self.in_features * self.out_features, self.rank * (self.in_features + self.out_features)
        return 2.0 * (dense + low + dense * self.weight.requires_grad + low * self.A.requires_grad)

    def trainable_for_warm_start(self) -> list[nn.Parameter]:
        return [self.weight, self.A, self.B]

    def set_warm_start(self, on: bool) -> None:
        """Train W alone (on) or the factors alone (off). Frozen tensors lose their gradient, so
        no optimizer steps them with a stale one."""
        self.weight.requires_grad_(on)
        self.A.requires_grad_(not on)
        self.B.requires_grad_(not on)
        for p in (self.weight, self.A, self.B):
            if not p.requires_grad:
                p.grad = None

    def saved_bytes(self, tokens: int, compute_size: int, autocast: bool) -> int:
        """x A^T (rank values a token); under autocast the bf16 copies of W, A and B (x W^T keeps
        W for the input's gradient and no x: W is frozen)."""
        copies = 2 * (self.in_features * self.out_features
                      + self.rank * (self.in_features + self.out_features))
        return tokens * self.rank * compute_size + (copies if autocast else 0)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"alpha={self.lora_alpha}")


class ReLoRAOptions(ScaledRankOptions):
    # Train the dense weights for this many update steps before the factors take over.
    warm_start_steps: int = Field(0, ge=0, json_schema_extra={"exclusive": True},
                                  description="update steps of dense training before the factors")


METHODS.register("relora", ReLoRALinear, options=ReLoRAOptions,
                 doc="ReLoRA: frozen dense W plus s·B·A, merged and restarted every --reset-every")
