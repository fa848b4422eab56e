"""Adam-mini: Adam with one second-moment value per block of parameters instead of one per entry.

"Adam-mini: Use Fewer Learning Rates To Gain More" (Zhang et al., ICLR 2025).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sltrain.config import OptimizerConfig
from sltrain.optim.base import SltrainOptimizer, apply_update_
from sltrain.optim.rounding import update_state_
from sltrain.registry import OPTIMIZERS

WHOLE = 0  # `block_rows` of a parameter that is one block (norm gains, sparse values)


class AdamMini(SltrainOptimizer):
    """Adam whose second moment `vmean` is the mean of g^2 over a block, one per block; the first
    moment `m` is full. A group's `block_rows` says what a block is: that many consecutive rows
    (dim 0) of a 2-D parameter (1: one per output neuron, token row or rank component; the
    head size for the query and key weights: one per head), or WHOLE: the whole tensor. Unset
    (a group built by hand), 2-D parameters get one block per row and the others one in all.

    Matches `adam_mini.Adam_mini` step for step on a dense LLaMA, whose partition by parameter
    names (heads for q/k, rows for v, o, MLP, embeddings and LM head, one block per norm) is the
    one the builder gives. The builder reads the partition from the model, not from names, so it
    also covers every parameterisation, where the reference's name rule fails: the factors and
    LoST columns of q/k have no dim x dim/n_heads blocks. There, the tensors whose rows are the
    layer's outputs (dense weight, B, LoST's C) get one block per head, A one per rank
    component, 1-D sparse values one per tensor. Each group carries its rule, so a per-layer
    copy holding one parameter (`--per-layer-updates`) partitions it the same way.
    """

    moment_keys = ("m", "vmean")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, kind="other",
                        block_rows=None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                rows = self.block_rows(p, group)
                if rows != WHOLE and (p.ndim < 2 or p.shape[0] % rows):
                    raise ValueError(f"blocks of {rows} rows do not tile a parameter of shape "
                                     f"{tuple(p.shape)}; use block_rows={WHOLE} (one block)")

    @staticmethod
    def block_rows(p: torch.Tensor, group: dict) -> int:
        rows = group["block_rows"]
        if rows is None:
            return 1 if p.ndim == 2 else WHOLE
        return rows

    def blocks(self, p: torch.Tensor, group: dict) -> int:
        rows = self.block_rows(p, group)
        return 1 if rows == WHOLE else p.shape[0] // rows

    def _block_mean_sq(self, grad: torch.Tensor, rows: int, n: int) -> torch.Tensor:
        """Mean of g^2 per block, in the reference's order of operations (sum / numel for a whole
        tensor, a mean along dim 1 of the (blocks, block size) view otherwise)."""
        if rows == WHOLE:
            return torch.sum(grad * grad) / grad.numel()
        g = grad.reshape(n, -1)
        return torch.mean(g * g, dim=1, keepdim=True)

    def update_(self, p: torch.Tensor, group: dict) -> None:
        state, grad = self.state[p], p.grad
        rows, n = self.block_rows(p, group), self.blocks(p, group)
        if "m" not in state:
            state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            shape = () if rows == WHOLE else (n, 1)
            state["vmean"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
            state["step"] = 0
        beta1, beta2 = group["betas"]
        update_state_(state["vmean"], self._block_mean_sq(grad, rows, n),
                      lambda v, x: v.mul_(beta2).add_(x, alpha=1 - beta2))
        state["step"] += 1
        shape = p.shape if rows == WHOLE else (n, -1)
        m = state["m"].view(shape)
        update_state_(m, grad.reshape(shape), lambda m_, g: m_.lerp_(g, 1 - beta1))
        bias_correction_1 = 1 - beta1 ** state["step"]
        bias_correction_2_sqrt = math.sqrt(1 - beta2 ** state["step"])
        h = (state["vmean"].sqrt() / bias_correction_2_sqrt).add_(group["eps"])
        update = m * ((1 / bias_correction_1) / h)
        update.mul_(group["lr"])
        apply_update_(p, update.view(p.shape), -1.0, group)

    def state_bytes(self, p: torch.Tensor, group: dict, element_size: int) -> int:
        return (p.numel() + self.blocks(p, group)) * element_size


def head_blocked(model: nn.Module) -> dict[int, int]:
    """id -> head size of the parameters whose rows are query or key outputs: the attention
    modules (those with a `head_dim`) own `q_proj` and `k_proj`; a layer's A factor has rank
    components for rows and is left out."""
    rows: dict[int, int] = {}
    for module in model.modules():
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int):
            continue
        for layer in (getattr(module, name, None) for name in ("q_proj", "k_proj")):
            if layer is None:
                continue
            factors = layer.factors() if hasattr(layer, "factors") else None
            skip = id(factors[0]) if factors else None
            for p in layer.parameters():
                if p.ndim == 2 and p.shape[0] == layer.out_features and id(p) != skip:
                    rows[id(p)] = head_dim
    return rows


def partitioned_groups(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Each group split by block rule: per head, per row (other 2-D tensors) or WHOLE."""
    heads = head_blocked(model)
    out = []
    for group in groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        by_rule: dict[int, list[torch.Tensor]] = {}
        for p in group["params"]:
            by_rule.setdefault(heads.get(id(p), 1 if p.ndim == 2 else WHOLE), []).append(p)
        out += [{**settings, "params": ps, "block_rows": rows} for rows, ps in by_rule.items()]
    return out


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> AdamMini:
    from sltrain.optim import param_groups

    groups = partitioned_groups(model, param_groups(model, cfg, split_matrices=False))
    return AdamMini(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


OPTIMIZERS.register("adam_mini", build,
                    doc="Adam-mini: one second moment per head, neuron or tensor; full first moment")
