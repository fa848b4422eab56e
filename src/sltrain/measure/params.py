"""Parameter counts of a (possibly meta-device) model: total, trainable, sparse values, indices.

The sparse and index counts are each re-parameterised layer's own (`FactoredLinear.sparse_counts`).
"""

from __future__ import annotations

from torch import nn

from sltrain.parametrize.base import FactoredLinear


def count_parameters(model: nn.Module) -> dict[str, int]:
    layers = [m.sparse_counts() for m in model.modules() if isinstance(m, FactoredLinear)]
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "sparse": sum(c["sparse"] for c in layers),
        "sparse_indices": sum(c["sparse_indices"] for c in layers),
    }
