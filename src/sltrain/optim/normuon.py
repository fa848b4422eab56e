"""NorMuon: Muon's orthogonalised momentum with a per-neuron (per output row) second moment.

"NorMuon: Making Muon more efficient and scalable" (Li, Liu et al., 2025).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sltrain.config import OptimizerConfig
from sltrain.optim.base import apply_update_
from sltrain.optim.muon import ADAMW_RMS, MatrixOptimizer, MuonOptions, newton_schulz
from sltrain.optim.rounding import update_state_
from sltrain.registry import OPTIMIZERS


class NorMuon(MatrixOptimizer):
    """NorMuon on "matrix" groups, AdamW on the rest, one learning rate for both.

    For an (m, n) weight with gradient G:
        M <- mu M + (1 - mu) G                       momentum_buffer, (m, n)
        O  = NewtonSchulz(M)
        v <- beta2 v + (1 - beta2) mean_cols(O * O)  exp_avg_sq, (m,): one value per output neuron
        O' = O / (sqrt(v) + eps)                     row i divided by sqrt(v_i)
        W <- W - lr * 0.2 sqrt(m n) / ||O'||_F * O'
    The last line gives the update RMS 0.2, AdamW's (the paper's rule; for an orthogonal O it is
    exactly Moonlight's 0.2 sqrt(max(m, n))). Because of it, v needs no bias correction: that
    would be one scalar for the whole matrix, and the Frobenius normalisation removes it.
    """

    moment_keys = ("momentum_buffer", "exp_avg", "exp_avg_sq")  # AdamW's on the "other" groups

    def __init__(self, params, lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95,
                 ns_steps: int = 5) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        ns_steps=ns_steps)
        super().__init__(params, defaults)

    def matrix_step_(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
            state["exp_avg_sq"] = p.new_zeros(p.size(0))
        buf, v = state["momentum_buffer"], state["exp_avg_sq"]
        beta2 = group["betas"][1]
        update_state_(buf, p.grad, lambda b, g: b.lerp_(g, 1.0 - group["momentum"]))
        ortho = newton_schulz(buf, group["ns_steps"])
        update_state_(v, ortho.square().mean(dim=1), lambda v_, x: v_.mul_(beta2).add_(x, alpha=1.0 - beta2))
        update = ortho / (v.sqrt().add_(group["eps"]).unsqueeze(1))
        # A zero update (e.g. a factor whose gradient is still zero) must stay zero, not NaN.
        scale = ADAMW_RMS * math.sqrt(p.numel()) / update.norm().clamp_min(1e-30)
        apply_update_(p, update * scale, -group["lr"], group)

    def matrix_state_bytes(self, p: Tensor, group: dict, element_size: int) -> int:
        return (p.numel() + p.shape[0]) * element_size


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> NorMuon:
    from sltrain.optim import param_groups

    return NorMuon(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                   momentum=cfg.momentum, ns_steps=cfg.ns_steps)


OPTIMIZERS.register("normuon", build, options=MuonOptions,
                    doc="NorMuon: Muon with per-row second-moment normalisation")
