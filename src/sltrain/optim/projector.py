"""Low-rank gradient projectors of the subspace optimizers: SVD (GaLore) and the SVD-free DCT.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et al., 2024) and
"SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language Models" (DCT basis).

A projector lives in the optimizer state of its parameter, so it round-trips through
`state_dict()`: "ortho" holds the SVD basis, "dct_idx" the indices of the chosen DCT vectors.
The smaller side of an (m, n) gradient is projected: right (G P^T, P: r x n) when m >= n, left
(P^T G, P: m x r) otherwise.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from pydantic import Field

from sltrain.registry import Options


class ProjectorError(RuntimeError):
    pass


def is_right(shape: torch.Size) -> bool:
    return shape[0] >= shape[1]


def dct_rows(n: int, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `idx` of the orthonormal DCT-II matrix of size n (rows are the basis vectors)."""
    k = idx.to(torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64, device=idx.device).unsqueeze(0)
    rows = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    rows[idx == 0] /= math.sqrt(2.0)
    return rows.to(dtype)


def basis(state: dict, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The projection matrix: r x n (right) or m x r (left)."""
    if "ortho" in state:
        return state["ortho"]
    right = is_right(shape)
    rows = dct_rows(shape[1] if right else shape[0], state["dct_idx"], dtype)
    return rows if right else rows.t()


def project(grad: torch.Tensor, state: dict) -> torch.Tensor:
    P = basis(state, grad.shape, grad.dtype)
    return grad @ P.t() if is_right(grad.shape) else P.t() @ grad


def project_back(low: torch.Tensor, state: dict, shape: torch.Size) -> torch.Tensor:
    P = basis(state, shape, low.dtype)
    return low @ P if is_right(shape) else P @ low


def _svd_basis(grad: torch.Tensor, rank: int) -> torch.Tensor:
    matrix = grad.float()
    try:
        U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
    except RuntimeError as e:  # torch.linalg.LinAlgError: no convergence
        raise ProjectorError(f"SVD did not converge ({str(e).splitlines()[0]})") from e
    P = Vh[:rank] if is_right(grad.shape) else U[:, :rank]
    if not torch.isfinite(P).all():
        raise ProjectorError("SVD returned non-finite singular vectors")
    # A copy, not a view: a slice of U or Vh would keep the whole factor's storage alive (the
    # reference implementation holds min(m, n)^2 values per matrix this way).
    return P.to(grad.dtype, copy=True)


def _dct_indices(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The r DCT vectors best aligned with the gradient: largest norms of G D^T (or D G)."""
    right = is_right(grad.shape)
    n = grad.shape[1] if right else grad.shape[0]
    D = dct_rows(n, torch.arange(n, device=grad.device), torch.float32)
    g = grad.float()
    scores = (g @ D.t()).norm(dim=0) if right else (D @ g).norm(dim=1)
    if not torch.isfinite(scores).all():
        raise ProjectorError("the gradient is not finite")
    return scores.topk(rank).indices.sort().values


def refresh(state: dict, grad: torch.Tensor, rank: int, kind: str) -> None:
    """Recompute the projector of one parameter from its gradient.

    A failed SVD (or a non-finite gradient) never zeroes the update silently: with an earlier
    projector it is kept and a warning says so (counted in `state["projector_failures"]`);
    without one the step raises.
    """
    try:
        if kind == "svd":
            state["ortho"] = _svd_basis(grad, rank)
        else:
            state["dct_idx"] = _dct_indices(grad, rank)
    except ProjectorError as e:
        shape = "x".join(map(str, grad.shape))
        if "ortho" not in state and "dct_idx" not in state:
            raise ProjectorError(
                f"cannot build the {kind} projector of a {shape} gradient: {e}; the gradient is "
                "probably non-finite; lower --lr or keep --grad-clip on"
            ) from e
        state["projector_failures"] = state.get("projector_failures", 0) + 1
        warnings.warn(f"{kind} projector refresh of a {shape} gradient failed ({e}); keeping the "
                      "previous projector", RuntimeWarning, stacklevel=3)


def projector_bytes(shape: torch.Size, rank: int, kind: str, element_size: int) -> int:
    return rank * min(shape) * element_size if kind == "svd" else rank * 8


def subspace_rank(shape: torch.Size, rank: int) -> int | None:
    """The projection rank for a matrix of `shape`, or None when projecting would not save
    anything (rank >= the smaller side): such matrices get plain Adam."""
    return rank if len(shape) == 2 and rank < min(shape) else None


class SubspaceOptions(Options):
    """Options of the subspace optimizers (GaLore, Fira, FRUGAL, Conda)."""

    proj_rank: int | None = Field(None, gt=0, description="projection rank (default: the run's rank)")
    update_proj_gap: int = Field(200, gt=0, description="update steps between projector refreshes")
    galore_scale: float = Field(0.25, gt=0, description="scale of the projected-back update")
    projector: Literal["svd", "dct"] = Field("svd", description="how the subspace is found")
