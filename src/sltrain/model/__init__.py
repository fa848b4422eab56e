"""Building the model a config describes: the LLaMA decoder with its linears re-parameterised.

Lean initialisation: built on the meta device, swapped there, then initialised module by module.
"""

from __future__ import annotations

import torch
from torch import nn

from sltrain.config import RunConfig
from sltrain.errors import UserError
from sltrain.model.llama import Llama, LlamaConfig
from sltrain.parametrize import ParamSpec, apply
from sltrain.registry import METHODS

__all__ = ["Llama", "LlamaConfig", "build_model", "param_spec"]


def param_spec(cfg: RunConfig) -> ParamSpec:
    return ParamSpec(method=cfg.method.name, options=cfg.method_options(),
                     targets=list(cfg.method.targets), seed=cfg.train.seed)


def _inits_in_place(method: str) -> bool:
    cls = METHODS[method].obj
    return cls is nn.Linear or bool(getattr(cls, "inits_in_place", lambda: False)())


def build_model(cfg: RunConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None,
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """A freshly initialised model on `device`, its floating tensors in `dtype` (default float32);
    on device "meta" nothing is allocated (for accounting). `param_dtype` instead initialises in
    float32 and casts each module's parameters as soon as they are drawn (buffers stay float32):
    the values of a float32 build cast afterwards, at the memory of the cast model.

    The decoder is built on meta and its targeted linears swapped for their factored layers
    there; then each module is materialised on `device` and initialised in place, from the run
    seed (`Llama.init_weights`). So the peak is the parameters plus one layer's transients: no
    factored layer's dense (out, in) weight exists unless its method is defined by one (LOST,
    the magnitude mask), and then one layer at a time. A plugin layer without `init_weights` is
    still built the old way, from the initialised dense model.
    """
    spec = param_spec(cfg)
    lean = _inits_in_place(spec.method)
    with torch.device("meta"):
        model = Llama(LlamaConfig(**cfg.model_dims()))
        if lean or str(device) == "meta":
            apply(model, spec)
    if dtype is not None:
        model.to(dtype)  # on meta: only the recorded dtypes change
    if str(device) == "meta":
        return model
    try:
        model.init_weights(cfg.model.init_std, seed=cfg.train.seed, device=device,
                           param_dtype=param_dtype if lean else None)
        return model if lean else apply(model, spec)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower():
            raise
        d = cfg.model_dims()
        raise UserError(f"the model (--dim {d['dim']}, --n-layers {d['n_layers']}, --vocab-size "
                        f"{d['vocab_size']}) does not fit in {device} memory; pass smaller sizes "
                        "(`sltrain memory` counts them)") from None
