"""Optimizers, built by name from the `[optimizer]` config section.

A new optimizer is one file here that registers its builder in `sltrain.registry.OPTIMIZERS`.
Every builder takes the model, the optimizer config and the run's rank, and returns a torch
optimizer whose parameter groups say which parameters are "matrix" (2-D attention/MLP weights)
and which are "other".
"""

from __future__ import annotations

import importlib
import pkgutil

import torch
from torch import nn

from sltrain.config import OptimizerConfig, RunConfig
from sltrain.optim import per_layer, tricks
from sltrain.registry import OPTIMIZERS

# 2-D weights that are not matrices of the blocks: they get AdamW in every optimizer.
NOT_MATRICES = ("embed_tokens", "lm_head")


def param_groups(model: nn.Module, cfg: OptimizerConfig, split_matrices: bool = True) -> list[dict]:
    """Trainable parameters in up to three groups: block matrices, other decayed parameters
    (embeddings, LM head, sparse values), and norm gains (never decayed)."""
    matrix, other, norms = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "norm" in name:
            norms.append(p)
        elif split_matrices and p.ndim == 2 and not any(k in name for k in NOT_MATRICES):
            matrix.append(p)
        else:
            other.append(p)
    groups = [
        {"params": matrix, "kind": "matrix", "weight_decay": cfg.weight_decay},
        {"params": other, "kind": "other", "weight_decay": cfg.weight_decay},
        {"params": norms, "kind": "other", "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _register_builtins() -> None:
    """Every module of this package that defines an optimizer registers its builder
    `build(model, cfg, rank) -> torch.optim.Optimizer` in sltrain.registry.OPTIMIZERS."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_builtins()


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, rank: int, grad_accum: int = 1
) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` over `model`'s trainable parameters; `rank` is the run's rank,
    the default projection rank of the subspace optimizers. With `cfg.per_layer_updates` every
    parameter steps on its own: in its gradient hook without accumulation (clipped as
    `cfg.per_layer_clip` says), after the Trainer's exact clipping with it."""
    optimizer = OPTIMIZERS[cfg.name].obj(model, cfg, getattr(cfg, "proj_rank", None) or rank)
    if cfg.per_layer_updates:
        per_layer.check(cfg.grad_clip, cfg.per_layer_clip, grad_accum)
        return per_layer.PerLayerOptimizer(optimizer, grad_accum, cfg.grad_clip, cfg.per_layer_clip)
    return optimizer


def validate(cfg: RunConfig, meta_model: nn.Module | None = None) -> None:
    """Refuse optimizer settings that cannot work, before any data or model work is done: the
    optimizer is built once over the meta-device model (no memory; built here unless the caller
    has one), so every check it makes (ranks, clipping with per-layer updates, 8-bit support)
    runs here."""
    from sltrain.model import build_model

    tricks.validate(cfg)
    model = meta_model if meta_model is not None else build_model(cfg, torch.device("meta"))
    optimizer = build_optimizer(model, cfg.optimizer, cfg.rank, cfg.train.grad_accum)
    if isinstance(optimizer, per_layer.PerLayerOptimizer):
        optimizer.remove_hooks()
