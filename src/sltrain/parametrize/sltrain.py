"""The SLTrain layer: W = s * B @ A + S, with S sparse on a random support fixed at init.

Implements "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining" (Han et al., NeurIPS 2024, arXiv 2406.02214).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from sltrain.parametrize.base import DensityOptions, FactoredLinear, ScaledRankOptions, autocast_off
from sltrain.registry import METHODS


def index_dtype(numel: int) -> torch.dtype:
    """The support's index dtype: int32 wherever the matrix has fewer than 2^31 entries."""
    return torch.int32 if numel < 2**31 else torch.int64


def random_support(numel: int, nnz: int, seed: int) -> torch.Tensor:
    """`nnz` sorted distinct flat indices in [0, numel), uniform without replacement, from a CPU
    generator seeded by `seed` (the same on every device and process), as int64.

    Memory is O(nnz), never O(numel): a 4096 x 11008 layer's randperm would take 360 MB. Draws
    with replacement are de-duplicated and topped up until there are enough; the distinct values
    of i.i.d. uniform draws are, given how many there are, a uniform subset of that size, and a
    seeded uniform choice of `nnz` of them keeps it uniform. Above half density the complement is
    drawn instead (a bool mask of numel bytes, at most 2 bytes per kept entry).
    """
    if not 0 < nnz <= numel:
        raise ValueError(f"cannot draw {nnz} distinct indices from {numel}")
    g = torch.Generator().manual_seed(seed)
    if 2 * nnz > numel:
        keep = torch.ones(numel, dtype=torch.bool)
        keep[_distinct_uniform(numel, numel - nnz, g)] = False
        return keep.nonzero().view(-1).to(index_dtype(numel))
    return _distinct_uniform(numel, nnz, g)


def _distinct_uniform(numel: int, k: int, g: torch.Generator) -> torch.Tensor:
    """`k` sorted distinct uniform indices below `numel` (k <= numel / 2) drawn from `g`."""
    # int32 sorts twice as fast, and the support is int32 wherever numel allows.
    dtype = index_dtype(numel)
    picked = torch.empty(0, dtype=dtype)
    while picked.numel() < k:
        # At most half the range is taken, so each draw is new with probability >= 1/2; a few
        # spare draws make one round enough at the paper's densities.
        missing = k - picked.numel()
        draws = torch.randint(numel, (missing + missing // 16 + 16,), generator=g, dtype=dtype)
        picked = torch.cat([picked, draws]).unique()
    extra = picked.numel() - k
    if extra:
        drop = torch.zeros(picked.numel(), dtype=torch.bool)
        drop[_distinct_uniform(picked.numel(), extra, g) if 2 * extra <= picked.numel()
             else torch.randperm(picked.numel(), generator=g)[:extra]] = True
        picked = picked[~drop]
    return picked


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


# Entries of the float32 block `compose_weight_in` composes at a time (16 MiB).
_BLOCK = 2**22


def compose_weight_in(
    A: torch.Tensor, B: torch.Tensor, values: torch.Tensor, support: torch.Tensor, scaling: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dense weight of `compose_weight` stored in the compute dtype `dtype`, without a dense
    matrix in the parameters' dtype beside it (float32 weights under bf16 autocast: a float32 W
    then a bf16 copy would hold 6 bytes an entry, this 2 and one block).

    Blocks of rows are composed in the parameters' dtype and each rounded once into W, so W is
    exactly today's float32 composition cast; casting B, A and the values to bf16 first would
    round three times (measured: 24% of a layer's outputs off by more than one bf16 step).
    `support` must be sorted, as every layer keeps it.
    """
    if A.dtype == dtype:
        return compose_weight(A, B, values, support, scaling)
    if torch.compiler.is_compiling():
        # The blocks' bounds are read on the host, a graph break per layer under torch.compile;
        # compiled, W is composed whole in the parameters' dtype and rounded once (the same
        # values; a transient W in that dtype, one layer's, while its forward runs).
        return compose_weight(A, B, values, support, scaling).to(dtype)
    out_features, in_features = B.shape[0], A.shape[1]
    weight = torch.empty(out_features, in_features, dtype=dtype, device=A.device)
    rows = max(1, _BLOCK // in_features)
    starts = [*range(0, out_features, rows), out_features]
    bounds = torch.tensor(starts, dtype=support.dtype, device=support.device) * in_features
    cuts = torch.searchsorted(support, bounds).tolist()
    for i, (r0, r1) in enumerate(zip(starts, starts[1:], strict=False)):
        block = low_rank_weight(A, B[r0:r1], scaling)
        add_sparse_(block, values[cuts[i]:cuts[i + 1]], support[cuts[i]:cuts[i + 1]] - r0 * in_features)
        weight[r0:r1] = block
        del block  # before the next block exists
    return weight


class _SparseLowRankMatmul(torch.autograd.Function):
    """y = x W^T without keeping W for backward: it is recomputed from the factors there.

    The dense weight gradient G = dY^T X is what a dense layer computes anyway; the trainable
    parameters read their gradients off it: dB = s G A^T, dA = s B^T G, dvalues = G at support.
    W is stored in the compute dtype only (`compose_weight_in`), and the backward frees W before
    G exists: one dense (out, in) matrix at its peak, not two.
    """

    @staticmethod
    def forward(ctx, x, A, B, values, support, scaling, dtype):  # type: ignore[override]
        x = x.to(dtype)
        weight = compose_weight_in(A, B, values, support, scaling, dtype)
        ctx.save_for_backward(x, A, B, values, support)
        ctx.scaling = scaling
        return F.linear(x, weight)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):  # type: ignore[override]
        x, A, B, values, support = ctx.saved_tensors
        s, dtype = ctx.scaling, grad_out.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = compose_weight_in(A, B, values, support, s, dtype)
            grad_x = (g @ weight).view(x.shape)
            del weight  # before G: the two dense matrices never coexist
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
        b_init: str = "zero",
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.lora_alpha, self.density = rank, lora_alpha, density
        self.b_init = b_init
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
        if not self.A.is_meta:
            self.init_weights(0.0)

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """The paper's init, in place and without any dense matrix: A kaiming-uniform
        U(+-1/sqrt(in)), B zero (so W starts as S), the values U(+-1/sqrt(in)), the support drawn
        from `self.seed` alone (`std` is unused: the layer is not defined from a dense init).
        With `b_init="uniform"` B is U(+-1/sqrt(r)) as the low-rank method's, drawn after A and
        the values so that both inits share every other tensor for a seed."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.A.uniform_(-bound, bound, generator=generator)
        self.B.zero_()
        self.values.uniform_(-bound, bound, generator=generator)
        if self.b_init == "uniform":
            self.B.uniform_(-1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank), generator=generator)
        picked = random_support(self.in_features * self.out_features, self.values.numel(), self.seed)
        self.support.copy_(picked)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, lora_alpha: float, density: float, seed: int,
        b_init: str = "zero", **_: object
    ) -> SparseLowRankLinear:
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, lora_alpha, density, seed,
                   device=w.device, dtype=w.dtype, b_init=b_init)

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

    def backward_transient_bytes(self, tokens: int, compute_size: int, autocast: bool) -> int:
        """The dense (out, in) matrix of the backward in the compute dtype: W for grad_x, freed
        before G = dY^T X (`_SparseLowRankMatmul`); under autocast W is composed from float32
        blocks of `_BLOCK` entries."""
        numel = self.in_features * self.out_features
        return numel * compute_size + (4 * min(numel, _BLOCK) if autocast else 0)

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
    # The paper starts B at zero (W = S); then A's first gradients are zero and Adam's slow
    # second moment lags their growth, and short runs spike and stall. "uniform" (the default
    # here) draws B as the low-rank method does; docs/results/default-run.md measures both.
    b_init: Literal["zero", "uniform"] = Field(
        "uniform", json_schema_extra={"exclusive": True},
        description="B at init: uniform U(+-1/sqrt(r)) (default) or zero (the paper's: W starts as S)")


METHODS.register("sltrain", SparseLowRankLinear, options=SLTrainOptions,
                 doc="W = s·B·A + S, S sparse on a random support fixed at init (the paper's)")
