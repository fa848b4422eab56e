"""Training: the Trainer (`train.trainer`), losses, schedules, pruning and the torchrun helpers.

`train` imports the trainer when called, not here: the trainer builds on every layer below it,
and those layers (evaluation, data scoring) use train/'s losses and distributed helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sltrain.config import RunConfig


def train(
    cfg: RunConfig,
    run_dir: Path | None = None,
    resume: Path | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Pretrain the model `cfg` describes; return the run summary (also in summary.json).

    `resume` is a run folder or checkpoint folder to continue from; `run_dir` defaults to a new
    folder under runs/ (or the resumed run's folder). `on_step(step, record)` runs after each
    update step. Under torchrun every process calls this; rank 0 writes the files.
    """
    from sltrain.train.trainer import Trainer

    return Trainer(cfg, run_dir, resume).train(on_step)
