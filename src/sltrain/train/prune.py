"""Gradual magnitude pruning during pretraining, and the parameter count it leaves over training.

Zhu & Gupta's ramp ("To prune, or not to prune", 2017): between update steps t0 and t1 the target
sparsity rises as s(t) = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3) (cubic) or s_f * (t - t0) /
(t1 - t0) (linear), 0 before t0 and s_f from t1 on; pruning events fall every `prune_every` steps
from t0 and at t1. "The Journey Matters" (REFERENCE.md §2) finds t0 = 25% and t1 = 75% of the run
near-optimal, and fits sparse and dense runs with one Chinchilla law in the AVERAGE parameter
count over training, which every run records (`params_nonzero` per step in metrics.jsonl,
`params_avg` and `params_final` in summary.json).

What is pruned, per layer by |w| (a pruned entry never comes back), is the layer's to say: a
dense targeted nn.Linear ("full") its weight, a re-parameterised layer its `prunable_tensors()`
(sparse's and SLTrain's sparse `values`; SLTrain's low-rank factors stay whole, since zeroing
entries of B or A does not zero entries of B @ A). Methods whose layer class is not `prunable`
(lowrank, relora, lost) are refused.
Pruned entries are zeroed in the weights after every update, in their gradients before it (so
clipping sees none) and in every optimizer-state tensor of the weight's shape (Adam's moments,
momentum buffers); the masks are saved with the training state, so a resumed run prunes exactly
as the uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sltrain.config import RunConfig
from sltrain.errors import UserError
from sltrain.parametrize import can, methods_that
from sltrain.parametrize.base import FactoredLinear


def prune_window(cfg: RunConfig) -> tuple[int, int]:
    """(t0, t1): the update steps at which the ramp starts and reaches its target."""
    p, total = cfg.prune, cfg.train.steps
    return round(p.prune_start * total), round(p.prune_end * total)


def ramp(cfg: RunConfig, t: float) -> float:
    """s(t), the schedule's sparsity at update step t (continuous, no events)."""
    p = cfg.prune
    t0, t1 = prune_window(cfg)
    if t < t0:
        return 0.0
    if t >= t1:
        return p.target_sparsity
    frac = (t - t0) / (t1 - t0)
    if p.prune_schedule == "linear":
        return p.target_sparsity * frac
    return p.target_sparsity * (1.0 - (1.0 - frac) ** 3)


def is_event(cfg: RunConfig, step: int) -> bool:
    t0, t1 = prune_window(cfg)
    return t0 <= step <= t1 and ((step - t0) % cfg.prune.prune_every == 0 or step == t1)


def sparsity_at(cfg: RunConfig, step: int) -> float:
    """The sparsity each pruned tensor holds after update `step`: s at the last event."""
    t0, t1 = prune_window(cfg)
    if cfg.prune.target_sparsity == 0 or step < t0:
        return 0.0
    if step >= t1:
        return cfg.prune.target_sparsity
    return ramp(cfg, t0 + (step - t0) // cfg.prune.prune_every * cfg.prune.prune_every)


def validate(cfg: RunConfig) -> None:
    """Refuse pruning settings that cannot work, before any data or model work."""
    if cfg.prune.target_sparsity == 0:
        return
    if not can(cfg.method.name, "prunable"):
        raise UserError(f"--target-sparsity prunes the weights of methods "
                        f"{', '.join(methods_that('prunable'))}, not {cfg.method.name}; pass "
                        "another --method or --target-sparsity 0")
    if cfg.optimizer.per_layer_updates:
        raise UserError("--target-sparsity masks gradients before the update, which per-layer "
                        "updates step inside backward; drop --per-layer-updates")
    if cfg.train.parallel == "fsdp":
        raise UserError("--target-sparsity needs whole weights but --parallel fsdp shards them; "
                        "use --parallel ddp")


def _layer_prunable(m: nn.Module, targeted: bool) -> list[tuple[str, nn.Parameter]]:
    """What pruning acts on in module `m`: a re-parameterised layer says; a dense targeted
    nn.Linear is pruned whole; anything else not at all."""
    if isinstance(m, FactoredLinear):
        return m.prunable_tensors()
    if isinstance(m, nn.Linear) and targeted:
        return [("weight", m.weight)]
    return []


def prunable(model: nn.Module, cfg: RunConfig) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the tensors the pruning acts on (see the module docstring)."""
    return [(f"{name}.{suffix}", p) for name, m in model.named_modules()
            for suffix, p in _layer_prunable(m, name.rsplit(".", 1)[-1] in cfg.method.targets)]


class Pruner:
    """Keeps the masks, applies the schedule after each update and counts the live parameters.

    Without pruning (`target_sparsity` 0) it only counts: every step has the model's count.
    """

    def __init__(self, model: nn.Module, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.active = cfg.prune.target_sparsity > 0
        self.total = sum(p.numel() for p in model.parameters())
        self.params = prunable(model, cfg) if self.active else []
        self.masks: dict[str, torch.Tensor] = {}  # name -> bool, False = pruned; made on first use
        self.pruned = 0
        self.nonzero_sum, self.steps_counted = 0, 0

    def nonzero(self) -> int:
        """Parameters of the model not pruned (frozen ones included, as ReLoRA's W)."""
        return self.total - self.pruned

    @torch.no_grad()
    def before_step(self) -> None:
        """Zero the gradients of pruned entries (before clipping and the update)."""
        for name, p in self.params:
            if name in self.masks and p.grad is not None:
                p.grad.mul_(self.masks[name])

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Prune if update `step` (1-based) is an event, zero every pruned entry, count."""
        record: dict[str, Any] = {}
        if self.active:
            if is_event(self.cfg, step):
                self._prune_to(sparsity_at(self.cfg, step))
            self._apply(optimizer)
            record["prune_sparsity"] = sparsity_at(self.cfg, step)
        count = self.nonzero()
        self.nonzero_sum += count
        self.steps_counted += 1
        record["params_nonzero"] = count
        return record

    def _prune_to(self, sparsity: float) -> None:
        for name, p in self.params:
            k = round(sparsity * p.numel())
            mask = self.masks.get(name)
            dead = 0 if mask is None else int((~mask).sum())
            if k <= dead:
                continue
            score = p.detach().abs().flatten().float()
            if mask is not None:
                score.masked_fill_(~mask.flatten(), -1.0)  # pruned entries stay pruned
            new = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
            new[torch.topk(score, k, largest=False, sorted=False).indices] = False
            self.masks[name] = new.view_as(p)
            self.pruned += k - dead

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        for name, p in self.params:
            mask = self.masks.get(name)
            if mask is None:
                continue
            p.mul_(mask)
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.mul_(mask)

    def summary(self) -> dict[str, float | int]:
        avg = self.nonzero_sum / self.steps_counted if self.steps_counted else self.nonzero()
        return {"params_avg": avg, "params_final": self.nonzero()}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.cpu() for k, v in self.masks.items()},
                "nonzero_sum": self.nonzero_sum, "steps_counted": self.steps_counted}

    def load_state_dict(self, state: dict[str, Any] | None, step: int) -> None:
        """Restore the masks and the running count (a checkpoint from before pruning existed
        counts its `step` earlier updates at the model's size)."""
        if state is None:
            self.nonzero_sum, self.steps_counted = self.total * step, step
            return
        devices = {name: p.device for name, p in self.params}
        self.masks = {k: v.to(devices[k]) for k, v in state["masks"].items() if k in devices}
        self.pruned = sum(int((~m).sum()) for m in self.masks.values())
        self.nonzero_sum, self.steps_counted = state["nonzero_sum"], state["steps_counted"]
