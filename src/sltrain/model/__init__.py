"""Building the model a config describes: the LLaMA decoder with its linears re-parameterised."""

from __future__ import annotations

import torch
from torch import nn

from sltrain.config import RunConfig
from sltrain.errors import UserError
from sltrain.model.llama import Llama, LlamaConfig
from sltrain.parametrize import ParamSpec, apply

__all__ = ["Llama", "LlamaConfig", "build_model", "param_spec"]


def param_spec(cfg: RunConfig) -> ParamSpec:
    return ParamSpec(method=cfg.method.name, options=cfg.method_options(),
                     targets=list(cfg.method.targets), seed=cfg.train.seed)


def build_model(cfg: RunConfig, device: str | torch.device = "cpu") -> nn.Module:
    """A freshly initialised model; on device "meta" nothing is allocated (for accounting)."""
    try:
        with torch.device(device):
            model = Llama(LlamaConfig(**cfg.model_dims()))
            if str(device) != "meta":
                model.init_weights(cfg.model.init_std)
            return apply(model, param_spec(cfg))
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower():
            raise
        d = cfg.model_dims()
        raise UserError(f"the model (--dim {d['dim']}, --n-layers {d['n_layers']}, --vocab-size "
                        f"{d['vocab_size']}) does not fit in {device} memory; pass smaller sizes "
                        "(`sltrain memory` counts them)") from None
