"""Learning-rate schedules as multipliers of the peak rate, by update step (not micro-batch).

`cosine`: linear warm-up, then cosine decay to `min_lr_ratio` (the SLTrain and GaLore default).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine(step: int, total: int, warmup: int, min_lr_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES: dict[str, Callable[[int, int, int, float], float]] = {"cosine": cosine}


def build_scheduler(
    optimizer: Optimizer, name: str, total: int, warmup: int, min_lr_ratio: float
) -> LambdaLR:
    fn = SCHEDULES[name]
    return LambdaLR(optimizer, lambda step: fn(step, total, warmup, min_lr_ratio))
