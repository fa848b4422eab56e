"""FRUGAL: a stateful optimizer in a gradient subspace, a state-free one for the rest.

"FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training"
(Zmushko et al., 2024).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from sltrain.config import OptimizerConfig
from sltrain.optim import projector
from sltrain.optim.base import adam_direction
from sltrain.optim.galore import GaLore, check_rank, options
from sltrain.optim.projector import SubspaceOptions
from sltrain.registry import OPTIMIZERS


class Frugal(GaLore):
    """Update = P(Adam(P^T G)) + state_free_lr_scale * f(G - P P^T G) with f = sign (signSGD)
    or the identity (SGD): every step is full-rank, only the subspace carries state.

    When the projector is refreshed the subspace moments are reset (their coordinates refer to
    the old basis) and the Adam bias correction restarts, as FRUGAL does; "adam_step" counts
    updates since the last reset.
    """

    def __init__(self, params, state_free: str = "signsgd", state_free_lr_scale: float = 1.0,
                 **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group.setdefault("state_free", state_free)
            group.setdefault("state_free_lr_scale", state_free_lr_scale)

    def matrix_update(self, p: torch.Tensor, state: dict, group: dict, rank: int) -> torch.Tensor:
        if self._refresh_if_due(p, state, group, rank):
            for key in ("exp_avg", "exp_avg_sq", "state1", "state2", "absmax1", "absmax2"):
                state.pop(key, None)
            state["adam_step"] = 0
        grad = p.grad
        low = projector.project(grad, state)
        state["step"] = state.get("step", 0) + 1
        state["adam_step"] += 1
        beta1, beta2 = group["betas"]
        direction, correction = adam_direction(low, state, beta1, beta2, group["eps"],
                                               step=state["adam_step"])
        residual = grad - projector.project_back(low, state, p.shape)
        free = residual.sign_() if group["state_free"] == "signsgd" else residual
        # The Adam part carries its bias correction; the state-free part takes the plain rate.
        update = projector.project_back(direction, state, p.shape).mul_(correction)
        return update.add_(free, alpha=group["state_free_lr_scale"])

    def step_size(self, state: dict, group: dict, step: int | None = None) -> float:
        if step is None and "adam_step" in state:
            return group["lr"]  # matrix updates already hold their bias correction
        return super().step_size(state, group, step)


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> Frugal:
    from sltrain.optim import param_groups

    kwargs = {**options(cfg, rank), "scale": 1.0}
    return Frugal(check_rank(param_groups(model, cfg), rank), state_free=cfg.state_free,
                  state_free_lr_scale=cfg.state_free_lr_scale, **kwargs)


class FrugalOptions(SubspaceOptions):
    # The state-free optimizer for the part of the gradient outside the subspace.
    state_free: Literal["signsgd", "sgd"] = Field("signsgd", description="optimizer outside the subspace")
    state_free_lr_scale: float = Field(1.0, ge=0, description="its learning rate relative to --lr")


OPTIMIZERS.register("frugal", build, options=FrugalOptions,
                    doc="FRUGAL: Adam in a subspace, state-free signSGD outside it")
