"""Weight parameterisations: swap a model's targeted nn.Linear layers, and merge them back.

peft-style: a `ParamSpec` says how to rebuild the layers, `apply` wraps, `merge` folds to dense.
A new parameterisation is one file here that registers its layer in `sltrain.registry.METHODS`.
"""

from __future__ import annotations

import importlib
import pkgutil
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from sltrain.errors import UserError
from sltrain.parametrize.base import FactoredLinear
from sltrain.registry import METHODS, Options

# Every module of this package registers its layer class in sltrain.registry.METHODS with its
# options; the class has `from_linear(linear, seed=, **options)` and `merged()`. "full" keeps
# the dense nn.Linear.
METHODS.register("full", nn.Linear, options=Options, doc="dense weights (the baseline)")


def _register_builtins() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_builtins()

# What a dense nn.Linear ("full") can do, in the terms of FactoredLinear's class attributes: its
# weight can be pruned (and is its own dense form), nothing else applies.
DENSE_CAPABILITIES = {"prunable": True, "mergeable": True}


def can(method: str, capability: str) -> bool:
    """Whether registered `method`'s layer class has `capability`, a class attribute of
    FactoredLinear (refactorable, prunable, has_cycles, mergeable); needs no model."""
    cls = METHODS[method].obj
    if isinstance(cls, type) and issubclass(cls, nn.Linear):
        return DENSE_CAPABILITIES.get(capability, False)
    return bool(getattr(cls, capability, False))


def methods_that(capability: str) -> list[str]:
    """The registered methods that have `capability` (for messages naming the choices)."""
    return [e.name for e in METHODS.entries() if can(e.name, capability)]


@dataclass
class ParamSpec:
    """How to rebuild a model's layers: the method, its resolved options, the targets, the seed."""

    method: str = "sltrain"
    options: dict[str, Any] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    seed: int = 0

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
    layer_cls = METHODS[spec.method].obj
    linears = targeted_linears(model, spec.targets)
    if not linears:
        raise UserError(f"no nn.Linear named {spec.targets} in the model; fix method.targets")
    if layer_cls is nn.Linear:
        return model
    density = spec.options.get("density")
    if density is not None and not 0 < density <= 1:
        raise UserError(f"density {density} is outside (0, 1]; pass e.g. --density 0.03")
    smallest = min(min(m.in_features, m.out_features) for _, m in linears)
    rank = spec.options.get("rank")
    if rank is not None and not 0 < rank <= smallest:
        raise UserError(
            f"rank {rank} is impossible: it must lie in 1..{smallest}, the smallest "
            f"min(in, out) of the targeted layers; pass e.g. --rank {max(1, smallest // 4)}"
        )
    for name, linear in linears:
        new = layer_cls.from_linear(linear, seed=layer_seed(spec.seed, name), **spec.options)
        _replace(model, name, new)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every re-parameterised layer back into a dense nn.Linear, in place. A model with a
    layer that has no dense form (not `mergeable`, e.g. CoLA) is refused, untouched, in one line:
    export, densify, soups, convert and --init-from into a dense run all come through here."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, FactoredLinear)]
    for _, module in layers:
        if not module.mergeable:
            raise UserError(module.no_dense_form())
    for name, module in layers:
        _replace(model, name, module.merged())
    return model
