"""Conda: Adam whose moments are taken in an orthogonal basis from the SVD of the momentum.

"Conda: Column-Normalized Adam for Training Large Language Models Faster" (Wang et al., 2025).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sltrain.config import OptimizerConfig
from sltrain.optim.base import apply_update_
from sltrain.optim.muon import MatrixOptimizer
from sltrain.optim.projector import SubspaceOptions
from sltrain.optim.rounding import update_state_
from sltrain.registry import OPTIMIZERS


def projection_rank(shape: torch.Size, rank: int) -> int:
    return min(rank, shape[0], shape[1])


def projects_left(shape: torch.Size) -> bool:
    """Project along the shorter side (the paper's choice): rows for wide matrices, else columns."""
    return shape[0] < shape[1]


class Conda(MatrixOptimizer):
    """Conda on "matrix" groups, AdamW on the rest.

    For an (m, n) weight with m < n (a wide matrix; tall ones use the transposed rule) and
    gradient G:
        M <- beta1 M + (1 - beta1) G                    exp_avg, (m, n)
        P  = first r left singular vectors of M         ortho, (m, r), every `update_proj_gap` steps
        v <- beta2 v + (1 - beta2) (P^T G)^2            exp_avg_sq, (r, n)
        W <- W - lr * c_t * P (P^T M / (sqrt(v) + eps))
    with c_t = sqrt(1 - beta2^t) / (1 - beta1^t) Adam's bias correction. Muon, written the same
    way with the full U, divides row i of U^T M by its singular value; Conda divides each entry
    by its own second moment, so each column keeps Adam's per-coordinate adaptivity.

    The first moment stays full size: the projector is the SVD of it. The update is already
    Adam-normalised entry by entry, so it has AdamW's update RMS and needs no Moonlight factor:
    the same `lr` drives AdamW on the "other" groups (at r < min(m, n) the update covers only
    the r-dimensional subspace, as in GaLore). `rank` is clamped to min(m, n); the paper uses
    min(m, n).
    """

    def __init__(self, params, lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int = 256,
                 update_proj_gap: int = 200) -> None:
        if rank < 1 or update_proj_gap < 1:
            raise ValueError(f"Conda needs rank >= 1 and update_proj_gap >= 1, got {rank} and "
                             f"{update_proj_gap}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap)
        super().__init__(params, defaults)

    def matrix_step_(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        r, left = projection_rank(p.shape, group["rank"]), projects_left(p.shape)
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = p.new_zeros((r, p.shape[1]) if left else (p.shape[0], r))
        state["step"] += 1
        step, grad, exp_avg, exp_avg_sq = state["step"], p.grad, state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        update_state_(exp_avg, grad, lambda m, g: m.lerp_(g, 1.0 - beta1))
        if (step - 1) % group["update_proj_gap"] == 0:
            # SVD in float32: bfloat16 has no SVD and its basis would drift from orthogonal.
            U, _, Vh = torch.linalg.svd(exp_avg.float(), full_matrices=False)
            state["ortho"] = (U[:, :r] if left else Vh[:r].T).to(p.dtype).contiguous()
        P = state["ortho"]

        def project(X: Tensor) -> Tensor:
            return P.T @ X if left else X @ P

        update_state_(exp_avg_sq, project(grad).square_(),
                      lambda v, x: v.mul_(beta2).add_(x, alpha=1.0 - beta2))
        direction = project(exp_avg) / exp_avg_sq.sqrt().add_(group["eps"])
        update = P @ direction if left else direction @ P.T
        correction = math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        apply_update_(p, update, -group["lr"] * correction, group)

    def matrix_state_bytes(self, p: Tensor, group: dict, element_size: int) -> int:
        m, n = p.shape
        r = projection_rank(p.shape, group["rank"])
        return (m * n + r * max(m, n) + r * min(m, n)) * element_size


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> Conda:
    from sltrain.optim import param_groups

    return Conda(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 rank=rank, update_proj_gap=cfg.update_proj_gap)


OPTIMIZERS.register("conda", build, options=SubspaceOptions,
                    doc="Conda: column-normalised Adam in a projected subspace")
