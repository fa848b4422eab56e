"""Weight parameterisations: swap a model's targeted nn.Linear layers, and merge them back.

peft-style: a `ParamSpec` says how to rebuild the layers, `apply` wraps, `merge` folds to dense.
A new parameterisation is one file here plus one line in `METHODS`.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field

from torch import nn

from sltrain.errors import UserError
from sltrain.parametrize.base import FactoredLinear
from sltrain.parametrize.lost import LOSTLinear
from sltrain.parametrize.lowrank import LowRankLinear
from sltrain.parametrize.relora import ReLoRALinear
from sltrain.parametrize.sltrain import SparseLowRankLinear
from sltrain.parametrize.sparse import SparseLinear

# name -> layer class with `from_linear(linear, rank=, lora_alpha=, density=, seed=)` and
# `merged()`; None keeps the dense nn.Linear.
METHODS: dict[str, type[nn.Module] | None] = {
    "full": None,
    "lowrank": LowRankLinear,
    "sltrain": SparseLowRankLinear,
    "relora": ReLoRALinear,
    "sparse": SparseLinear,
    "lost": LOSTLinear,
}


@dataclass
class ParamSpec:
    method: str = "sltrain"
    rank: int = 64
    lora_alpha: float = 32.0
    density: float = 0.03
    targets: list[str] = field(default_factory=list)
    seed: int = 0
    mask: str = "random"  # sparse: how the fixed support is chosen (random or magnitude)

    def to_dict(self) -> dict:
        return asdict(self)


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends only on the run seed and the layer's name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def targeted_linears(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def apply(model: nn.Module, spec: ParamSpec) -> nn.Module:
    """Swap every targeted nn.Linear of `model` for the layer of `spec.method`, in place."""
    if spec.method not in METHODS:
        raise UserError(f"unknown method '{spec.method}'; choose one of {', '.join(METHODS)}")
    layer_cls = METHODS[spec.method]
    linears = targeted_linears(model, spec.targets)
    if not linears:
        raise UserError(f"no nn.Linear named {spec.targets} in the model; fix method.targets")
    if layer_cls is None:
        return model
    if not 0 < spec.density <= 1:
        raise UserError(f"density {spec.density} is outside (0, 1]; pass e.g. --density 0.03")
    smallest = min(min(m.in_features, m.out_features) for _, m in linears)
    if getattr(layer_cls, "uses_rank", True) and not 0 < spec.rank <= smallest:
        raise UserError(
            f"rank {spec.rank} is impossible: it must lie in 1..{smallest}, the smallest "
            f"min(in, out) of the targeted layers; pass e.g. --rank {max(1, smallest // 4)}"
        )
    for name, linear in linears:
        new = layer_cls.from_linear(  # type: ignore[attr-defined]
            linear, rank=spec.rank, lora_alpha=spec.lora_alpha, density=spec.density,
            seed=layer_seed(spec.seed, name), mask=spec.mask,
        )
        _replace(model, name, new)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every re-parameterised layer back into a dense nn.Linear, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FactoredLinear):
            _replace(model, name, module.merged())
    return model
