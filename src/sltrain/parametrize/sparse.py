"""The static sparse layer: W is zero outside a fixed unstructured mask chosen at init.

The pretraining phase of "Sparse Pre-training and Dense Fine-tuning for Large Language Models"
(SPDF, Thangarasa et al., 2023): up to 75% of each weight is pruned once, at initialisation, and
stays pruned; `sltrain densify` then frees every weight for a dense phase.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from sltrain.parametrize.base import DensityOptions, FactoredLinear, autocast_off
from sltrain.parametrize.sltrain import index_dtype, random_support
from sltrain.registry import METHODS

MASKS = ("random", "magnitude")


def scatter_weight(values: torch.Tensor, support: torch.Tensor, out_features: int,
                   in_features: int) -> torch.Tensor:
    """The dense (out, in) weight holding `values` at the flat indices `support`, zero elsewhere."""
    weight = values.new_zeros(out_features * in_features)
    return weight.index_add_(0, support, values).view(out_features, in_features)


def choose_support(dense: torch.Tensor, nnz: int, mask: str, seed: int) -> torch.Tensor:
    """`nnz` sorted flat indices of `dense` to keep: uniformly at random (seeded) or its
    largest |w| (the magnitude mask)."""
    if mask == "magnitude":
        return torch.topk(dense.detach().abs().flatten(), nnz, sorted=False).indices.sort().values
    return random_support(dense.numel(), nnz, seed).to(dense.device)


class _SparseMatmul(torch.autograd.Function):
    """y = x W^T with W = scatter(values at support), not kept for backward (rebuilt there).

    The values' gradient is the dense weight gradient G = dY^T X gathered at the support, so the
    pruned entries get no gradient, no optimizer state and stay exactly zero.
    """

    @staticmethod
    def forward(ctx, x, values, support, out_features, in_features, dtype):  # type: ignore[override]
        x = x.to(dtype)
        weight = scatter_weight(values.to(dtype), support, out_features, in_features)
        ctx.save_for_backward(x, values, support)
        ctx.shape = (out_features, in_features)
        return F.linear(x, weight)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):  # type: ignore[override]
        x, values, support = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = scatter_weight(values.to(grad_out.dtype), support, *ctx.shape)
            grad_x = (g @ weight).view(x.shape)
            del weight  # before G: the two dense matrices never coexist
        G = g.t() @ x.reshape(-1, x.shape[-1])
        grad_values = G.view(-1).index_select(0, support).to(values.dtype)
        return grad_x, grad_values, None, None, None, None


class SparseLinear(FactoredLinear):
    """A bias-free linear layer whose weight is `values` at `support` and zero elsewhere.

    `support` holds the sorted flat indices (row * in_features + col) of the kept entries, a
    persistent buffer (saved and restored with the weights, never trained); `mask` says how it was
    chosen at init: "random" (uniform, seeded by `seed` like SLTrain's) or "magnitude" (the
    largest |w| of the dense initialisation). The values start as the dense init at the support.
    """

    prunable = True  # gradual magnitude pruning thins the values further

    def __init__(
        self,
        in_features: int,
        out_features: int,
        density: float,
        seed: int = 0,
        mask: str = "random",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init: bool = True,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.density, self.seed, self.mask = density, seed, mask
        numel = in_features * out_features
        nnz = max(1, round(density * numel))
        self.values = nn.Parameter(torch.empty(nnz, device=device, dtype=dtype))
        self.register_buffer("support", torch.empty(nnz, dtype=index_dtype(numel), device=device))
        if init:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, dense: torch.Tensor | None = None) -> None:
        """Pick the support from `dense` (default: a fresh U(+-1/sqrt(in)) draw, as nn.Linear's)
        and keep its entries there as the values."""
        if self.values.is_meta:
            return
        if dense is None:
            bound = 1.0 / math.sqrt(self.in_features)
            dense = torch.empty(self.out_features, self.in_features, device=self.values.device,
                                dtype=self.values.dtype).uniform_(-bound, bound)
        picked = choose_support(dense, self.values.numel(), self.mask, self.seed)
        self.support.copy_(picked.to(self.support.dtype))
        self.values.copy_(dense.flatten().index_select(0, self.support))

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """The values are a dense Normal(0, std) init (the dense linears') at the support. With
        the random mask they are drawn at the support alone, no dense matrix; the magnitude mask
        is defined by a dense init, so one is drawn transiently, for this layer only."""
        if self.mask == "magnitude":
            dense = torch.empty(self.out_features, self.in_features, device=self.values.device,
                                dtype=self.values.dtype).normal_(0.0, std, generator=generator)
            self.reset_parameters(dense)
            return
        picked = random_support(self.in_features * self.out_features, self.values.numel(), self.seed)
        self.support.copy_(picked)
        self.values.normal_(0.0, std, generator=generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, density: float, seed: int, mask: str = "random",
                    **_: object) -> SparseLinear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, density, seed, mask,
                    device=w.device, dtype=w.dtype, init=False)
        if not w.is_meta:
            layer.reset_parameters(w)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            return _SparseMatmul.apply(x, self.values, self.support, self.out_features,
                                       self.in_features, dtype)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return scatter_weight(self.values, self.support, self.out_features, self.in_features)

    def prunable_tensors(self) -> list[tuple[str, nn.Parameter]]:
        return [("values", self.values)]

    def index_buffers(self) -> list[torch.Tensor]:
        return [self.support]

    def sparse_counts(self) -> dict[str, int]:
        return {"sparse": self.values.numel(), "sparse_indices": self.support.numel()}

    def backward_transient_bytes(self, tokens: int, compute_size: int, autocast: bool) -> int:
        """The dense (out, in) matrix of the backward in the compute dtype: W for grad_x, freed
        before G = dY^T X (`_SparseMatmul`)."""
        return self.in_features * self.out_features * compute_size

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, density={self.density}, "
                f"mask={self.mask}, nnz={self.values.numel()}")


class SparseOptions(DensityOptions):
    # The fixed support is drawn at random (seeded per layer) or keeps the largest |w| of the
    # dense initialisation; `density` is the fraction kept.
    mask: Literal["random", "magnitude"] = Field("random", json_schema_extra={"exclusive": True},
                                                 description="how the fixed support is chosen")


METHODS.register("sparse", SparseLinear, options=SparseOptions,
                 doc="a fixed unstructured sparse weight (SPDF's sparse pretraining)")
