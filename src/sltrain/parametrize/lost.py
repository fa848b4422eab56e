"""The LOST layer: W = B @ A + S, both parts cut from the SVD of the dense initial weight.

Implements the initialisation of "LOST: Low-rank and Sparse Pre-training for Large Language
Models" (Li et al., 2025, arXiv 2508.02668): the dense init W0 = U diag(s) V^T is split into its
head, the top-`rank` singular components (B = U_r sqrt(s_r), A = sqrt(s_r) V_r^T), and its tail
R = W0 - B A, built from the remaining singular values. The sparse part S is channel-wise: it keeps
the k = round(density * in) whole input columns of R with the largest L2 norm, stored as a dense
(out, k) block `C` plus the k column indices `channels`; the other columns of R are dropped. The
support (which columns) is fixed for the run; B, A and C train. No scaling between the two parts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sltrain.parametrize.base import DensityOptions, FactoredLinear, RankOptions
from sltrain.registry import METHODS


def kept_channels(in_features: int, density: float) -> int:
    """How many whole input columns the sparse part keeps: round(density * in), at least one."""
    return min(in_features, max(1, round(density * in_features)))


@torch.no_grad()
def lost_split(weight: torch.Tensor, rank: int, k: int) -> tuple[torch.Tensor, ...]:
    """(B, A, C, channels) of a dense (out, in) `weight`: B @ A its best rank-`rank` approximation
    with balanced factors, C the k columns of the residual with the largest norm, `channels` their
    sorted indices. Computed in float32, or float64 for a float64 weight."""
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = S[:rank].sqrt()
    B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]
    residual = w - B @ A
    channels = residual.norm(dim=0).topk(k).indices.sort().values
    return B, A, residual[:, channels], channels


class LOSTLinear(FactoredLinear):
    """A bias-free linear layer whose weight is B @ A + S, where S is zero outside the input
    columns `channels` and equals C there.

    `channels` is a persistent buffer (saved and restored with the weights, never trained).
    `init_residual_norm` is ||W0 - (B A + S)||_F at initialisation, the part of the dense init
    the layer discards, and `init_residual_rel` the same relative to ||W0||_F (nan where the
    layer was not built from a dense weight).
    """

    refactorable = True  # B and A are free; S lives on other coordinates (the channels)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        density: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.density = rank, density
        k = kept_channels(in_features, density)
        kw = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.C = nn.Parameter(torch.zeros(out_features, k, **kw))
        self.register_buffer("channels", torch.arange(k, device=device))
        self.init_residual_norm = self.init_residual_rel = float("nan")

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, density: float, **_: object
    ) -> LOSTLinear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, density,
                    device=w.device, dtype=w.dtype)
        if not w.is_meta:
            layer.init_from_(w)
        return layer

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """LOST is defined from a dense init: draw W0 ~ Normal(0, std) (the dense linears' init)
        transiently, for this layer only, split it (`init_from_`) and drop it; lean
        initialisation so holds one dense (out, in) matrix at a time, never the dense model."""
        dense = torch.empty(self.out_features, self.in_features, device=self.A.device,
                            dtype=self.A.dtype).normal_(0.0, std, generator=generator)
        self.init_from_(dense)

    @torch.no_grad()
    def init_from_(self, weight: torch.Tensor) -> None:
        """Split the dense (out, in) `weight` into the factors, the kept channels and the
        discarded tail (whose norm it records)."""
        B, A, C, channels = lost_split(weight, self.rank, self.C.shape[1])
        self.B.copy_(B)
        self.A.copy_(A)
        self.C.copy_(C)
        self.channels.copy_(channels)
        w = weight.double()
        tail = (w - self.dense_weight().double()).norm().item()
        self.init_residual_norm = tail
        self.init_residual_rel = tail / w.norm().item() if w.any() else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x A^T) B^T + x[..., channels] C^T: no dense (out, in) matrix is formed.
        return F.linear(F.linear(x, self.A), self.B) + F.linear(x.index_select(-1, self.channels), self.C)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return torch.mm(self.B, self.A).index_add_(1, self.channels, self.C)

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.A, self.B

    def flops_per_token(self, tokens_per_batch: int) -> float:
        """(x A^T) B^T plus x[..., channels] C^T: 2 r (in + out) + 2 out k."""
        low = self.rank * (self.in_features + self.out_features)
        return 2.0 * (low + self.out_features * self.C.shape[1])

    def saved_bytes(self, tokens: int, compute_size: int, autocast: bool) -> int:
        """x A^T (rank values a token) and x[..., channels] (k), which the matmuls after them
        keep; under autocast the bf16 copies of A, B and C."""
        k = self.C.shape[1]
        copies = 2 * (self.rank * (self.in_features + self.out_features) + self.out_features * k)
        return tokens * (self.rank + k) * compute_size + (copies if autocast else 0)

    def index_buffers(self) -> list[torch.Tensor]:
        return [self.channels]

    def sparse_counts(self) -> dict[str, int]:
        return {"sparse": self.C.numel(), "sparse_indices": self.channels.numel()}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"density={self.density}, channels={self.C.shape[1]}")


class LOSTOptions(RankOptions, DensityOptions):
    pass


METHODS.register("lost", LOSTLinear, options=LOSTOptions,
                 doc="LOST: SVD head as B·A plus a channel-wise sparse complement")
