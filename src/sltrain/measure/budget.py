"""Which training setups fit a memory budget: `sltrain memory --budget 24GiB`, from the peak
prediction (measure/peak.py) of each method x optimizer x precision x checkpointing.

No paper: the setups are the ones the memory-efficient pretraining papers compare (GaLore,
SLTrain: AdamW, 8-bit Adam, 8-bit GaLore, per-layer updates); each gets its largest micro-batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sltrain.config import RunConfig
from sltrain.errors import UserError
from sltrain.measure.peak import PeakPrediction, StepModel
from sltrain.registry import METHODS, OPTIMIZERS

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# (method, optimizer): the comparisons of the GaLore and SLTrain papers' memory tables.
SETUPS = (("full", "adamw"), ("full", "adam8bit"), ("full", "galore8bit"),
          ("sltrain", "adamw"), ("sltrain", "adam8bit"), ("lowrank", "adamw"))
PRECISIONS = ("bf16", "bf16-mixed")
CHECKPOINTING = ("none", "full")
MAX_BATCH = 4096  # micro-batches tried: 1, 2, 4, ... up to this
RANKING = ("micro-batch (largest first), then no recomputation before activation checkpointing, "
           "then trainable parameters (most first), then predicted peak (lowest first)")


def parse_size(text: str) -> int:
    """Bytes of a size such as 24GiB, 24 GB, 500MiB or 1.5GB (units B, KB, MB, GB, TB and their
    binary KiB ... TiB, any case); a UserError naming the value otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", text)
    if not m or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--budget {text!r} is not a memory size; pass a number with a unit, "
                        "e.g. 24GiB, 24GB, 500MiB or 500MB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


@dataclass
class Fit:
    """A setup that fits: its largest micro-batch and the prediction at it."""

    method: str
    optimizer: str
    per_layer: bool
    precision: str
    checkpointing: str
    micro_batch: int
    trainable: int
    peak: PeakPrediction

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "optimizer": self.optimizer, "per_layer_updates": self.per_layer,
                "precision": self.precision, "activation_checkpointing": self.checkpointing,
                "micro_batch": self.micro_batch, "trainable_params": self.trainable,
                "peak": self.peak.to_dict()}


def _entry(section: dict[str, Any], registry: Any, name: str) -> dict[str, Any]:
    """A config section switched to entry `name` of `registry`, without the options that only
    other entries declare (they would be refused)."""
    own = registry[name].options.model_fields
    others = set(registry.option_fields()) - set(own)
    return {**{k: v for k, v in section.items() if k not in others}, registry.key: name}


def _config(cfg: RunConfig, method: str, optimizer: str, per_layer: bool) -> RunConfig:
    tree = cfg.to_dict()
    tree["method"] = _entry(tree["method"], METHODS, method)
    tree["optimizer"] = {**_entry(tree["optimizer"], OPTIMIZERS, optimizer),
                         "per_layer_updates": per_layer}
    return RunConfig.model_validate(tree)


def largest_batch(step_model: StepModel, precision: str, checkpointing: str,
                  budget: int) -> tuple[int, PeakPrediction] | None:
    """(the largest power-of-two micro-batch whose predicted peak fits `budget`, its prediction),
    or None when one sequence does not fit."""
    best, batch = None, 1
    while batch <= MAX_BATCH:
        peak = step_model.predict(precision, batch, checkpointing)
        if peak.total > budget:
            break
        best, batch = (batch, peak), batch * 2
    return best


def rank_key(fit: Fit) -> tuple:
    """Largest micro-batch first; then no recomputation before checkpointing; then more
    trainable parameters (closer to full-rank training); then the lower peak."""
    return (-fit.micro_batch, fit.checkpointing != "none", -fit.trainable, fit.peak.total)


def setup_fits(cfg: RunConfig, model: Any, optimizer: str, per_layer: bool,
               budget: int) -> list[Fit]:
    """The precisions x checkpointing modes of one method x optimizer x per-layer setting that
    fit `budget`, each at its largest micro-batch."""
    from sltrain.measure import count_parameters

    step_model = StepModel(_config(cfg, cfg.method.name, optimizer, per_layer), model)
    trainable = count_parameters(model)["trainable"]
    out = []
    try:
        for precision in PRECISIONS:
            for ckpt in CHECKPOINTING:
                found = largest_batch(step_model, precision, ckpt, budget)
                if found:
                    out.append(Fit(cfg.method.name, optimizer, per_layer, precision, ckpt,
                                   found[0], trainable, found[1]))
    finally:
        step_model.close()
    return out


def fits(cfg: RunConfig, budget: int) -> tuple[list[Fit], dict[str, str]]:
    """(every setup of SETUPS x per-layer updates x PRECISIONS x CHECKPOINTING that fits
    `budget` at cfg's shape and sequence length, with its largest micro-batch, ranked by
    `rank_key`; {"method + optimizer": why} for those that cannot be built here, such as 8-bit
    states without bitsandbytes)."""
    from sltrain.model import build_model

    out, skipped = [], {}
    for method in dict.fromkeys(m for m, _ in SETUPS):
        method_cfg = _config(cfg, method, "adamw", False)
        model = build_model(method_cfg, device="meta")
        for optimizer in (o for m, o in SETUPS if m == method):
            for per_layer in (False, True):
                try:
                    out += setup_fits(method_cfg, model, optimizer, per_layer, budget)
                except UserError as e:
                    skipped[f"{method} + {optimizer}"] = str(e)
    return sorted(out, key=rank_key), skipped
