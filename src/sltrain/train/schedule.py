"""Learning-rate schedules as multipliers of the peak rate, by update step (not micro-batch).

`cosine`: linear warm-up, then cosine decay to `min_lr_ratio` (the SLTrain and GaLore default).
Any schedule re-warms after optimizer-state resets (ReLoRA's jagged cosine).
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


def restart_ramp(step: int, cycle_start: int | None, restart_warmup: int) -> float:
    """After an optimizer-state reset at update `cycle_start` the rate climbs linearly back over
    `restart_warmup` updates (ReLoRA's jagged schedule, the recovery ramp of momentum resets).
    `step` is the 0-based index of the coming update; the first one after the reset gets
    1 / restart_warmup of the rate, never zero."""
    if cycle_start is None or restart_warmup == 0:
        return 1.0
    return min(1.0, (step - cycle_start + 1) / restart_warmup)


def build_scheduler(
    optimizer: Optimizer, name: str, total: int, warmup: int, min_lr_ratio: float,
    restart_warmup: int = 0, cycle_start: Callable[[int], int | None] = lambda step: None,
) -> LambdaLR:
    """A LambdaLR over update steps; `cycle_start(step)` gives the last optimizer-state reset
    at or before `step` (or None), after which the rate re-warms over `restart_warmup` steps."""
    fn = SCHEDULES[name]
    return LambdaLR(optimizer, lambda step: fn(step, total, warmup, min_lr_ratio)
                    * restart_ramp(step, cycle_start(step), restart_warmup))
