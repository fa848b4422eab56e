"""AuON: momentum kept in a spectral-norm trust region by normalisation and cosh-RMS scaling.

"AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates" (Maity, 2025).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sltrain.config import OptimizerConfig
from sltrain.optim.base import apply_update_
from sltrain.optim.muon import ADAMW_RMS, MatrixOptimizer, MomentumOptions, newton_schulz
from sltrain.optim.rounding import update_state_
from sltrain.registry import OPTIMIZERS


def auon_direction(M: Tensor, hybrid: bool = False) -> Tensor:
    """The AuON direction of a momentum matrix M, with ||U||_2 <= ||U||_F < 1 for M != 0:

        G = M / ||M||_F            (hybrid: G = X / ||X||_F, X one Newton-Schulz step of M)
        U = G / sqrt(mean(cosh(G)^2))

    ||G||_2 <= ||G||_F = 1, and cosh >= 1 with equality only at 0, so the RMS of cosh(G) is above
    1: the division is a contraction that brakes hardest when a few entries dominate.
    """
    X = newton_schulz(M, 1) if hybrid else M
    X = X.float()
    G = X / (X.norm() + 1e-7)
    return (G / (torch.cosh(G).square().mean().sqrt() + 1e-8)).to(M.dtype)


class AuON(MatrixOptimizer):
    """AuON (or Hybrid-AuON) on "matrix" groups, AdamW on the rest, one learning rate for both.

    For an (m, n) weight with gradient G:
        B <- mu B + (1 - mu) G                 momentum_buffer
        U  = auon_direction((1 - mu) G + mu B) Nesterov look-ahead; linear time unless hybrid
        W <- W - lr * 0.2 sqrt(m n) * U
    U has unit Frobenius norm (less under the cosh brake) where a semi-orthogonal matrix has
    sqrt(min(m, n)), so Moonlight's factor 0.2 sqrt(max(m, n)) becomes 0.2 sqrt(m n): the update
    RMS is at most 0.2, AdamW's, and ||update||_2 <= lr * 0.2 sqrt(m n) * ||U||_2 with ||U||_2 < 1.
    """

    moment_keys = ("momentum_buffer", "exp_avg", "exp_avg_sq")  # AdamW's on the "other" groups

    def __init__(self, params, lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95,
                 hybrid: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        hybrid=hybrid)
        super().__init__(params, defaults)

    def matrix_step_(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, mu = state["momentum_buffer"], group["momentum"]
        update_state_(buf, p.grad, lambda b, g: b.lerp_(g, 1.0 - mu))
        U = auon_direction(p.grad.lerp(buf, mu), group["hybrid"])
        apply_update_(p, U, -group["lr"] * ADAMW_RMS * math.sqrt(p.numel()), group)

    def matrix_state_bytes(self, p: Tensor, group: dict, element_size: int) -> int:
        return p.numel() * element_size


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> AuON:
    from sltrain.optim import param_groups

    return AuON(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                momentum=cfg.momentum)


def build_hybrid(model: nn.Module, cfg: OptimizerConfig, rank: int) -> AuON:
    from sltrain.optim import param_groups

    return AuON(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                momentum=cfg.momentum, hybrid=True)


OPTIMIZERS.register("auon", build, options=MomentumOptions,
                    doc="AuON: momentum normalised without Newton-Schulz")
OPTIMIZERS.register("auon_hybrid", build_hybrid, options=MomentumOptions,
                    doc="AuON hybrid: AuON with a Newton-Schulz step")
