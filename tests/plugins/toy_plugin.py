"""A parameterisation and an optimizer registered from outside `sltrain`, as a user's plugin is.

`gated_lowrank`: W = diag(g) · B·A with a learnable per-output gain g; `signum`: sign of an
exponential moving average of the gradient (one momentum tensor per parameter). Loaded by
tests/test_plugin.py, in process and through SLTRAIN_PLUGINS; nothing here is part of sltrain.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from sltrain.optim import param_groups
from sltrain.optim.base import SltrainOptimizer
from sltrain.parametrize.base import FactoredLinear
from sltrain.registry import METHODS, OPTIMIZERS, Options


class GatedLowRankOptions(Options):
    rank: int | None = Field(None, gt=0, description="rank of B·A (default: the preset's)")
    gate_init: float = Field(1.0, gt=0, description="initial value of every output gain")


class GatedLowRankLinear(FactoredLinear):
    def __init__(self, in_features: int, out_features: int, rank: int, gate_init: float,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.gate = nn.Parameter(torch.full((out_features,), gate_init, **kw))
        if not self.A.is_meta:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.normal_(self.B, std=0.02)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, gate_init: float, **_: object):
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, gate_init, w.device, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.gate

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return self.gate[:, None] * (self.B @ self.A)


class SignumOptions(Options):
    signum_beta: float = Field(0.9, ge=0, lt=1, description="momentum of signum")


class Signum(SltrainOptimizer):
    moment_keys = ("momentum_buffer",)

    def __init__(self, params, lr: float, beta: float):
        super().__init__(params, dict(lr=lr, beta=beta, kind="other", weight_decay=0.0))

    def update_(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        m = state["momentum_buffer"]
        m.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
        p.add_(m.sign(), alpha=-group["lr"])

    def state_bytes(self, p: torch.Tensor, group: dict, element_size: int) -> int:
        return p.numel() * element_size


def build_signum(model: nn.Module, cfg, rank: int) -> Signum:
    return Signum(param_groups(model, cfg, split_matrices=False), cfg.lr, cfg.signum_beta)


METHODS.register("gated_lowrank", GatedLowRankLinear, options=GatedLowRankOptions,
                 doc="diag(g)·B·A (a test plugin)")
OPTIMIZERS.register("signum", build_signum, options=SignumOptions, doc="sign momentum (a test plugin)")
