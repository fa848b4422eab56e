"""AdamW (torch's fused/foreach implementation) with exact state accounting.

"Decoupled Weight Decay Regularization" (Loshchilov & Hutter, 2019): the default optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from sltrain.config import OptimizerConfig
from sltrain.registry import OPTIMIZERS


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW; state per parameter: exp_avg, exp_avg_sq and a float32 step tensor."""

    moment_keys = ("exp_avg", "exp_avg_sq")

    def state_bytes(self, p: torch.Tensor, group: dict, element_size: int) -> int:
        return 2 * p.numel() * element_size + 4

    def shared_state_bytes(self) -> int:
        return 0


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> AdamW:
    from sltrain.optim import param_groups

    return AdamW(param_groups(model, cfg, split_matrices=False), lr=cfg.lr,
                 betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


OPTIMIZERS.register("adamw", build, doc="AdamW (torch's foreach kernel); the default", elementwise=True)
