"""Fira: GaLore's subspace Adam plus the gradient outside the subspace, norm-scaled and limited.

"Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?" (Chen et al., 2024).
"""

from __future__ import annotations

import torch
from torch import nn

from sltrain.config import OptimizerConfig
from sltrain.optim import projector
from sltrain.optim.galore import GaLore, check_rank, options
from sltrain.optim.projector import SubspaceOptions
from sltrain.registry import OPTIMIZERS

GROWTH_LIMIT = 1.01  # the residual update's norm may grow at most 1% per step


class Fira(GaLore):
    """Update = scale * P(Adam(P^T G)) + phi * (G - P P^T G), where phi is, per row (right
    projection) or column (left), ||Adam direction|| / ||projected gradient||, and the residual
    update's norm is limited to grow by GROWTH_LIMIT per step.

    Matches `fira.FiraAdamW` step for step when scale = 1. Deliberate difference: the reference
    forms the residual as G - scale * P P^T G, so for scale != 1 a (1 - scale) share of the
    in-subspace gradient leaks into the residual; here the residual is the exact orthogonal
    complement G - P P^T G, as in the paper. Weight decay and SVD failures as in `GaLore`.
    """

    def matrix_update(self, p: torch.Tensor, state: dict, group: dict, rank: int) -> torch.Tensor:
        self._refresh_if_due(p, state, group, rank)
        grad = p.grad
        low = projector.project(grad, state)
        state["step"] = state.get("step", 0) + 1
        direction = self._direction(low, state, group)
        norm_dim = 0 if direction.shape[0] < direction.shape[1] else 1
        phi = direction.norm(dim=norm_dim) / (low.norm(dim=norm_dim) + 1e-8)
        if norm_dim == 1:
            phi = phi.unsqueeze(1)
        residual = (grad - projector.project_back(low, state, p.shape)) * phi
        norm = residual.norm()
        if "residual_norm" in state:
            limiter = torch.clamp(norm / (state["residual_norm"] + 1e-8), min=GROWTH_LIMIT) / GROWTH_LIMIT
            residual.div_(limiter)
            norm = norm / limiter
        state["residual_norm"] = norm
        return projector.project_back(direction, state, p.shape) * group["scale"] + residual

    def state_bytes(self, p: torch.Tensor, group: dict, element_size: int) -> int:
        extra = element_size if self._subspace(p, group) is not None else 0
        return super().state_bytes(p, group, element_size) + extra


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> Fira:
    from sltrain.optim import param_groups

    return Fira(check_rank(param_groups(model, cfg), rank), **options(cfg, rank))


OPTIMIZERS.register("fira", build, options=SubspaceOptions,
                    doc="Fira: GaLore plus the scaled residual outside the subspace")
