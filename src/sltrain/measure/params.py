"""Parameter counts of a (possibly meta-device) model: total, trainable, sparse values, indices."""

from __future__ import annotations

from torch import nn

from sltrain.parametrize.lost import LOSTLinear
from sltrain.parametrize.sltrain import SparseLowRankLinear
from sltrain.parametrize.sparse import SparseLinear

SPARSE_LAYERS = (SparseLowRankLinear, SparseLinear)  # layers with sparse `values` at a `support`


def count_parameters(model: nn.Module) -> dict[str, int]:
    sparse = [m for m in model.modules() if isinstance(m, SPARSE_LAYERS)]
    lost = [m for m in model.modules() if isinstance(m, LOSTLinear)]  # S: C on `channels`
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "sparse": sum(m.values.numel() for m in sparse) + sum(m.C.numel() for m in lost),
        "sparse_indices": sum(m.support.numel() for m in sparse) + sum(m.channels.numel() for m in lost),
    }
