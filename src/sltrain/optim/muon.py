"""Muon: momentum orthogonalised by a Newton-Schulz iteration on 2-D weights, AdamW elsewhere.

"Muon: An optimizer for hidden layers in neural networks" (Jordan et al., 2024), with the update
scale of "Muon is Scalable for LLM Training" (Moonlight, Liu et al., 2025).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from sltrain.config import OptimizerConfig
from sltrain.optim.base import SltrainOptimizer, apply_update_
from sltrain.optim.rounding import update_state_
from sltrain.registry import OPTIMIZERS, Options

# The quintic's coefficients (Jordan et al.): chosen to push small singular values towards 1 as
# fast as possible rather than to converge exactly, so 5 steps leave them in roughly [0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Moonlight: AdamW's update has an RMS of about 0.2 in LLM training; an (m, n) semi-orthogonal
# matrix has RMS 1/sqrt(max(m, n)), so 0.2 * sqrt(max(m, n)) lets one learning rate serve both.
ADAMW_RMS = 0.2


def newton_schulz(G: Tensor, steps: int) -> Tensor:
    """The nearest semi-orthogonal matrix U V^T to G = U S V^T, approximately, in float32
    (bfloat16 on CUDA, where it is fast and accurate enough). Returns G's shape and dtype."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    # Frobenius normalisation puts every singular value in [0, 1], where the iteration converges.
    X = X / (X.norm() + 1e-7)
    # Iterating on the wide orientation makes X @ X.T the smaller Gram matrix.
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    if tall:
        X = X.T
    return X.to(G.dtype)


def rms_matching_scale(shape: torch.Size) -> float:
    """The factor that gives an orthogonalised (m, n) update AdamW's RMS (Moonlight)."""
    return ADAMW_RMS * math.sqrt(max(shape[0], shape[1]))


class MatrixOptimizer(SltrainOptimizer):
    """Steps "matrix" groups with the subclass's `matrix_step_` and "other" groups with AdamW.

    A group without a `kind` (e.g. `Muon(model.parameters())`) treats 2-D parameters as
    matrices and the rest as "other".
    """

    def __init__(self, params, defaults: dict) -> None:
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if group.get("kind") == "matrix" and p.ndim != 2:
                    raise ValueError(f"a 'matrix' group holds a parameter of shape {tuple(p.shape)}; "
                                     "only 2-D weights can be orthogonalised, put it in an 'other' group")

    @staticmethod
    def is_matrix(p: Tensor, group: dict) -> bool:
        return group.get("kind", "matrix" if p.ndim == 2 else "other") == "matrix"

    def matrix_step_(self, p: Tensor, group: dict) -> None:
        raise NotImplementedError

    def matrix_state_bytes(self, p: Tensor, group: dict, element_size: int) -> int:
        raise NotImplementedError

    def state_bytes(self, p: Tensor, group: dict, element_size: int) -> int:
        if self.is_matrix(p, group):
            return self.matrix_state_bytes(p, group, element_size)
        return 2 * p.numel() * element_size  # AdamW's exp_avg and exp_avg_sq; the int step is free

    def update_(self, p: Tensor, group: dict) -> None:
        if self.is_matrix(p, group):
            self.matrix_step_(p, group)
        else:
            self.adamw_other_(p, group)


class Muon(MatrixOptimizer):
    """Muon on "matrix" groups: Nesterov momentum B <- mu B + G, direction G + mu B, orthogonalised
    by `ns_steps` Newton-Schulz steps and scaled by 0.2 sqrt(max(m, n)) to AdamW's update RMS, so
    that the single `lr` also drives AdamW on the "other" groups. State: `momentum_buffer`."""

    moment_keys = ("momentum_buffer", "exp_avg", "exp_avg_sq")  # AdamW's on the "other" groups

    def __init__(self, params, lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95,
                 ns_steps: int = 5) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        ns_steps=ns_steps)
        super().__init__(params, defaults)

    def matrix_step_(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        update_state_(buf, p.grad, lambda b, g: b.mul_(group["momentum"]).add_(g))
        update = newton_schulz(p.grad.add(buf, alpha=group["momentum"]), group["ns_steps"])
        apply_update_(p, update, -group["lr"] * rms_matching_scale(p.shape), group)

    def matrix_state_bytes(self, p: Tensor, group: dict, element_size: int) -> int:
        return p.numel() * element_size


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> Muon:
    from sltrain.optim import param_groups

    return Muon(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                momentum=cfg.momentum, ns_steps=cfg.ns_steps)


class MomentumOptions(Options):
    momentum: float = Field(0.95, ge=0, lt=1, description="momentum of the orthogonalised update")


class MuonOptions(MomentumOptions):
    ns_steps: int = Field(5, gt=0, description="Newton-Schulz iterations per orthogonalisation")


OPTIMIZERS.register("muon", build, options=MuonOptions,
                    doc="Muon: orthogonalised momentum on block matrices, AdamW elsewhere")
