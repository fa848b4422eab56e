"""The SLTrain layer: W = s * B @ A + S, with S sparse on a random support fixed at init.

Implements "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining" (Han et al., NeurIPS 2024, arXiv 2406.02214).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sltrain.parametrize.base import DensityOptions, FactoredLinear, ScaledRankOptions
from sltrain.registry import METHODS


def index_dtype(numel: int) -> torch.dtype:
    """The support's index dtype: int32 wherever the matrix has fewer than 2^31 entries."""
    return torch.int32 if numel < 2**31 else torch.int64


def random_support(numel: int, nnz: int, seed: int) -> torch.Tensor:
    """`nnz` sorted flat indices drawn uniformly without replacement from a generator seeded by
    `seed` (the same on every process), as int64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=g)[:nnz].sort().values


def low_rank_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The (out, in) low-rank part s * B @ A."""
    return torch.mm(B, A).mul_(scaling)


def add_sparse_(weight: torch.Tensor, values: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """`weight` plus the sparse part S (`values` at the flat indices `support`), in place."""
    weight.view(-1).index_add_(0, support, values)
    return weight


def compose_weight(
    A: torch.Tensor, B: torch.Tensor, values: torch.Tensor, support: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The dense (out, in) weight s * B @ A + scatter(values at support)."""
    return add_sparse_(low_rank_weight(A, B, scaling), values, support)


class _SparseLowRankMatmul(torch.autograd.Function):
    """y = x W^T without keeping W for backward: it is recomputed from the factors there.

    The dense weight gradient G = dY^T X is what a dense layer computes anyway; the trainable
    parameters read their gradients off it: dB = s G A^T, dA = s B^T G, dvalues = G at support.
    """

    @staticmethod
    def forward(ctx, x, A, B, values, support, scaling, dtype):  # type: ignore[override]
        x = x.to(dtype)
        weight = compose_weight(A, B, values, support, scaling).to(dtype)
        ctx.save_for_backward(x, A, B, values, support)
        ctx.scaling = scaling
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, A, B, values, support = ctx.saved_tensors
        s, dtype = ctx.scaling, grad_out.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = compose_weight(A, B, values, support, s).to(dtype)
            grad_x = (g @ weight).view(x.shape)
        G = g.t() @ x.reshape(-1, x.shape[-1])
        grad_values = G.view(-1).index_select(0, support).to(values.dtype)
        grad_B = (G @ A.to(dtype).t()).mul_(s).to(B.dtype)
        grad_A = (B.to(dtype).t() @ G).mul_(s).to(A.dtype)
        return grad_x, grad_A, grad_B, grad_values, None, None, None


class SparseLowRankLinear(FactoredLinear):
    """A bias-free linear layer whose weight is s * B @ A + S (S: `values` at `support`).

    `support` holds the flat indices (row * in_features + col) of S's non-zeros, sorted, drawn
    uniformly without replacement from a generator seeded by `seed`, so that the same seed gives
    the same support on every process. It is a persistent buffer: saved and restored with the
    weights, never trained. It is int32 wherever the matrix has fewer than 2^31 entries.

    Pruning thins S only: zeroing entries of B or A does not zero entries of B @ A.
    """

    refactorable = True
    prunable = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        lora_alpha: float,
        density: float,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.lora_alpha, self.density = rank, lora_alpha, density
        self.scaling = lora_alpha / rank
        self.seed = seed
        numel = in_features * out_features
        nnz = max(1, round(density * numel))
        kw = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.values = nn.Parameter(torch.empty(nnz, **kw))
        self.register_buffer("support", torch.empty(nnz, dtype=index_dtype(numel), device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.A.is_meta:
            return
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.A, -bound, bound)
        nn.init.zeros_(self.B)
        nn.init.uniform_(self.values, -bound, bound)
        picked = random_support(self.in_features * self.out_features, self.values.numel(), self.seed)
        self.support.copy_(picked.to(self.support.dtype))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, lora_alpha: float, density: float, seed: int, **_: object
    ) -> SparseLowRankLinear:
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, lora_alpha, density, seed,
                   device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            return _SparseLowRankMatmul.apply(
                x, self.A, self.B, self.values, self.support, self.scaling, dtype
            )

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return compose_weight(self.A, self.B, self.values, self.support, self.scaling)

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.A, self.B

    def flops_per_token(self, tokens_per_batch: int) -> float:
        """x W^T, 2 in out, plus composing W = s B A once per forward call (2 out r in)."""
        n, r = self.in_features * self.out_features, self.rank
        return 2.0 * n + 2.0 * n * r / tokens_per_batch

    def backward_flops_per_token(self, tokens_per_batch: int) -> float:
        """dY W and G = dY^T X (4 in out), plus per backward call recomposing W and G A^T, B^T G
        (3 x 2 out r in); the sparse gather and the scalings are element-wise, not counted."""
        n, r = self.in_features * self.out_features, self.rank
        return 4.0 * n + 6.0 * n * r / tokens_per_batch

    def prunable_tensors(self) -> list[tuple[str, nn.Parameter]]:
        return [("values", self.values)]

    def index_buffers(self) -> list[torch.Tensor]:
        return [self.support]

    def sparse_counts(self) -> dict[str, int]:
        return {"sparse": self.values.numel(), "sparse_indices": self.support.numel()}

    @torch.no_grad()
    def spectra_parts(self) -> dict[str, torch.Tensor]:
        """W, its low-rank part s * B @ A and its sparse part S, each as the forward composes it."""
        low = low_rank_weight(self.A, self.B, self.scaling)
        sparse = add_sparse_(torch.zeros_like(low), self.values, self.support)
        return {"weight": self.dense_weight(), "low_rank": low, "sparse": sparse}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"alpha={self.lora_alpha}, density={self.density}, nnz={self.values.numel()}")


class SLTrainOptions(ScaledRankOptions, DensityOptions):
    pass


METHODS.register("sltrain", SparseLowRankLinear, options=SLTrainOptions,
                 doc="W = s·B·A + S, S sparse on a random support fixed at init (the paper's)")
