"""Per-cycle update tricks for factored layers: ReLoRA merges, SVD refactorisation, state pruning.

"ReLoRA: High-Rank Training Through Low-Rank Updates" (Lialin et al.) and "Scalable Parameter and
Memory Efficient Pretraining for LLM: Recent Algorithmic Advances and Benchmarking".

Every `optimizer.reset_every` update steps a cycle ends: layers with cycles (ReLoRA) fold their
factors into the dense weight and restart them (`end_cycle_`); refactorable layers re-split B @ A
through an SVD (`refactor_`). Either way the optimizer moments of the changed parameters are pruned
or reset, and the learning rate re-warms from the reset (`CycleTricks.cycle_start`). What a layer
can do is its class's to say (sltrain.parametrize.base.FactoredLinear); which state entries are
moments is the optimizer's (`moment_keys`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from sltrain.config import RunConfig, flag_for
from sltrain.errors import UserError
from sltrain.parametrize import can, layer_seed, methods_that
from sltrain.parametrize.base import FactoredLinear

# torch's and bitsandbytes' own optimizers declare no `moment_keys`; these are the names they
# give their moments (Adam's, SGD's momentum, AdamW8bit's state1/state2). Every sltrain optimizer
# declares its own.
UNDECLARED_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "state1", "state2")
_UNDECLARED_MODULES = ("torch.", "bitsandbytes.")


# ---- refactorisation ------------------------------------------------------------------------------
def refactor_(module: nn.Module) -> None:
    """Re-split the product B @ A of a refactorable layer as B = U sqrt(S), A = sqrt(S) V^T.

    The layer's function is unchanged up to float32 rounding and the rank is kept; the same
    Parameters are written, so optimizer state stays keyed to them, but their moments now describe
    other coordinates: reset them (CycleTricks does).
    """
    if not (isinstance(module, FactoredLinear) and module.refactorable):
        raise TypeError(f"refactor_ needs the layer of one of the methods "
                        f"{', '.join(methods_that('refactorable'))}, got {type(module).__name__}")
    module.refactor_()


# ---- optimizer-state pruning ----------------------------------------------------------------------
def moment_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The state entries of `optimizer` that are moments: a key matches if it is or ends with one
    of these (the optimizer's `moment_keys`). Every other entry (step, projectors) is no moment."""
    declared = getattr(optimizer, "moment_keys", None)
    if declared is not None:
        return tuple(declared)
    if type(optimizer).__module__.startswith(_UNDECLARED_MODULES):
        return UNDECLARED_MOMENTS
    raise TypeError(f"{type(optimizer).__name__} declares no moment_keys; give the class a "
                    "`moment_keys` tuple naming its moment state entries")


def _holders(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> list[torch.optim.Optimizer]:
    """The optimizers that keep `p`'s state: a per-layer wrapper says; otherwise the optimizer."""
    if hasattr(optimizer, "optimizers_for"):
        return list(optimizer.optimizers_for(p))
    return [optimizer]


def _largest(values: torch.Tensor, keep: int) -> torch.Tensor:
    """A boolean mask of exactly `keep` entries of largest magnitude (ties broken arbitrarily)."""
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if keep > 0:
        mask.view(-1)[values.abs().flatten().topk(keep, sorted=False).indices] = True
    return mask


def _prune_quantized_(state: dict, key: str, moment: str, fraction: float) -> int:
    """Prune a bitsandbytes 8-bit moment: uint8 codes into `qmapN`, scaled per block by `absmaxN`
    (N the moment's index, as in state1/state2)."""
    import bitsandbytes.functional as bnbf

    from sltrain.optim.adam8bit import BLOCKSIZE

    prefix, index = key[: -len(moment)], key[-1]
    if prefix + "absmax" + index not in state:
        raise ValueError(f"8-bit state '{key}' has no blockwise absmax; only blockwise 8-bit states prune")
    codes, absmax, qmap = state[key], state[prefix + "absmax" + index], state[prefix + "qmap" + index]
    values = bnbf.dequantize_blockwise(codes, absmax=absmax, code=qmap, blocksize=BLOCKSIZE)
    keep = round((1.0 - fraction) * codes.numel())
    # Writing the code of an exact zero (rather than re-quantising) keeps the surviving values
    # bit-exact and every block's absmax valid even when a block is pruned away entirely.
    zero_code = int(qmap.abs().argmin())
    codes.masked_fill_(~_largest(values, keep), zero_code)
    return codes.numel() - keep


@torch.no_grad()
def prune_state_(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], prune: float) -> int:
    """Zero all but the largest (1 - prune) fraction by magnitude of each moment tensor of `params`
    in `optimizer`'s state (ReLoRA's magnitude pruning; prune=1.0 resets the moments).

    Moments are the entries the optimizer holding the state names in `moment_keys` (float, or
    bitsandbytes' blockwise 8-bit codes); "step" and every other entry stay as they are. Returns
    the number of entries zeroed.
    """
    if not 0.0 <= prune <= 1.0:
        raise ValueError(f"prune fraction {prune} is outside [0, 1]")
    zeroed = 0
    for p in params:
        for holder in _holders(optimizer, p):
            keys, state = moment_keys(holder), holder.state.get(p) or {}
            for key, value in list(state.items()):
                moment = next((k for k in keys if key.endswith(k)), None)
                if moment is None or not isinstance(value, torch.Tensor):
                    continue
                if value.dtype == torch.uint8:
                    zeroed += _prune_quantized_(state, key, moment, prune)
                elif value.is_floating_point():
                    keep = round((1.0 - prune) * value.numel())
                    value.masked_fill_(~_largest(value, keep), 0)
                    zeroed += value.numel() - keep
    return zeroed


def drop_state_(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Forget every optimizer-state entry of `params`, freeing its memory."""
    for p in params:
        for holder in _holders(optimizer, p):
            holder.state.pop(p, None)


# ---- the per-cycle schedule of tricks -------------------------------------------------------------
def _choices(names: list[str]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def warm_start_steps(cfg: RunConfig) -> int:
    """The chosen method's warm-start length (0 for a method without the option)."""
    return getattr(cfg.method.options(), "warm_start_steps", 0)


def validate(cfg: RunConfig) -> None:
    """Refuse combinations of method and tricks that cannot work, naming the fix. (A warm start
    for a method without one is refused by the config: the option belongs to its method.)"""
    method, opt = cfg.method.name, cfg.optimizer
    every = flag_for("optimizer.reset_every")
    if can(method, "has_cycles") and opt.reset_every == 0:
        raise UserError(f"method {method} ends a cycle (merges and restarts its factors) every "
                        f"{every} steps, which is 0; pass e.g. {every} 1000")
    if opt.refactor and not can(method, "refactorable"):
        refactor, ok = flag_for("optimizer.refactor"), methods_that("refactorable")
        raise UserError(f"{refactor} re-splits the B @ A factors of methods {', '.join(ok)}, "
                        f"not {method}; pass --method {_choices(ok)}, or drop {refactor}")
    if (opt.refactor or opt.reset_momentum) and opt.reset_every == 0:
        trick = flag_for("optimizer.refactor" if opt.refactor else "optimizer.reset_momentum")
        raise UserError(f"{trick} acts every {every} steps, which is 0; pass e.g. {every} 1000")


def include_warm_start_params(model: nn.Module, cfg: RunConfig) -> None:
    """For a run with a warm start (ReLoRA's), make every parameter either phase trains trainable
    before the optimizer is built, so that it holds them all; CycleTricks then freezes the phase's
    others."""
    if warm_start_steps(cfg) > 0:
        for layer in model.modules():
            if isinstance(layer, FactoredLinear):
                for p in layer.trainable_for_warm_start():
                    p.requires_grad_(True)


def _holds(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> bool:
    if hasattr(optimizer, "optimizers_for"):
        return bool(optimizer.optimizers_for(p))
    return any(q is p for group in optimizer.param_groups for q in group["params"])


class CycleTricks:
    """Runs the tricks `cfg` asks for after each update step.

    Build it after the optimizer; `start_step` is the number of update steps already done (on
    resume). Call `after_step(step)` with the number of completed update steps after each update.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig,
                 start_step: int = 0):
        validate(cfg)
        opt = cfg.optimizer
        self.model, self.optimizer = model, optimizer
        self.seed = cfg.train.seed
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FactoredLinear)]
        self.cycling = [(n, m) for n, m in layers if m.has_cycles]
        self.factored = [m for _, m in layers if m.refactorable]
        self.warm_layers = [m for _, m in layers if m.trainable_for_warm_start()]
        self.warm_start = warm_start_steps(cfg) if self.warm_layers else 0
        self.warm_event = f"{cfg.method.name}_warm_start_end"
        self.every = opt.reset_every
        self.refactor = opt.refactor and bool(self.factored)
        self.reset_momentum = opt.reset_momentum
        self.state_prune = opt.state_prune
        self.resets = bool(self.every) and (bool(self.cycling) or self.refactor or self.reset_momentum)
        self.start_at(start_step)

    def start_at(self, step: int) -> None:
        """Continue after `step` completed update steps: the warm start is on only before its end."""
        self.step = step
        if self.warm_start:
            warm = step < self.warm_start
            both = [p for m in self.warm_layers for p in m.trainable_for_warm_start()]
            if warm and not all(_holds(self.optimizer, p) for p in both):
                raise RuntimeError("the warm start needs an optimizer over the parameters of both "
                                   "phases; call include_warm_start_params before building it")
            for layer in self.warm_layers:
                layer.set_warm_start(warm)

    def state_dict(self) -> dict[str, int]:
        # Everything else the tricks do follows from the step (ReLoRA's fresh factors are seeded
        # by the run, the layer and the step), so the step is their whole state.
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start_at(state["step"])

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _end_cycles(self, step: int) -> dict[str, int]:
        stale = []
        for name, layer in self.cycling:
            # A seed from the run, the layer and the step rather than the global RNG: every
            # data-parallel rank draws the same fresh values, and a resumed run draws what the
            # uninterrupted one would have.
            device = next(layer.parameters()).device
            g = torch.Generator(device).manual_seed(layer_seed(self.seed, f"{name}@{step}"))
            stale += layer.end_cycle_(g)
        # ReLoRA keeps the few largest moments: the rest describe the old factors.
        prune_state_(self.optimizer, stale, self.state_prune)
        return dict(Counter(layer.cycle_event for _, layer in self.cycling))

    def after_step(self, step: int) -> dict[str, int]:
        """Apply whatever falls due after update `step` (1-based); returns what happened."""
        self.step = step
        events: dict[str, int] = {}
        if self.warm_start and step == self.warm_start:
            for layer in self.warm_layers:
                layer.set_warm_start(False)
            # What only the warm start trained never trains again: its moments are dead weight.
            frozen = [p for m in self.warm_layers for p in m.trainable_for_warm_start()
                      if not p.requires_grad]
            drop_state_(self.optimizer, frozen)
            events[self.warm_event] = 1
        if not self.resets or step <= self.warm_start or (step - self.warm_start) % self.every:
            return events
        if self.cycling:
            events.update(self._end_cycles(step))
        if self.refactor:
            for layer in self.factored:
                layer.refactor_()
            # The factors now have other coordinates, so their moments are meaningless: reset them
            # whether or not reset_momentum asks for it.
            prune_state_(self.optimizer, [p for layer in self.factored for p in layer.factors()], 1.0)
            events["refactor"] = len(self.factored)
        if self.reset_momentum:
            prune_state_(self.optimizer, self._trainable(), 1.0)
            events["momentum_reset"] = 1
        return events

    def cycle_start(self, step: int) -> int | None:
        """The most recent step <= `step` after which the optimizer state was reset (the end of the
        warm start counts: the factors start with no state), or None; the schedule re-warms from it."""
        w = self.warm_start
        if self.resets and step > w and (step - w) // self.every > 0:
            return w + (step - w) // self.every * self.every
        return w if w and step >= w else None
