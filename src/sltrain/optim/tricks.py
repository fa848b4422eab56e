"""Per-cycle update tricks for factored layers: ReLoRA merges, SVD refactorisation, state pruning.

"ReLoRA: High-Rank Training Through Low-Rank Updates" (Lialin et al.) and "Scalable Parameter and
Memory Efficient Pretraining for LLM: Recent Algorithmic Advances and Benchmarking".

Every `optimizer.reset_every` update steps a cycle ends: ReLoRA folds its factors into the dense
weight and restarts them; low-rank and SLTrain layers re-split B @ A through an SVD. Either way the
optimizer moments of the changed parameters are pruned or reset, and the learning rate re-warms
from the reset (`CycleTricks.cycle_start`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sltrain.config import RunConfig, flag_for
from sltrain.errors import UserError
from sltrain.parametrize import layer_seed
from sltrain.parametrize.lost import LOSTLinear
from sltrain.parametrize.lowrank import LowRankLinear
from sltrain.parametrize.relora import ReLoRALinear
from sltrain.parametrize.sltrain import SparseLowRankLinear

# Layers whose weight (or low-rank part) is B @ A with both factors free: `refactor_` applies.
REFACTORABLE = (LowRankLinear, SparseLowRankLinear, LOSTLinear)

# Optimizer-state entries that are moments; a key matches if it is or ends with one of these
# (subspace optimizers prefix theirs). Every other entry (step, projectors) is left alone.
FLOAT_MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer")
# bitsandbytes' 8-bit moments: uint8 codes into `qmapN`, scaled per block by `absmaxN`
# (float32 below its min_8bit_size).
QUANTIZED_MOMENTS = {"state1": ("absmax1", "qmap1"), "state2": ("absmax2", "qmap2")}


# ---- refactorisation ------------------------------------------------------------------------------
@torch.no_grad()
def refactor_(module: nn.Module) -> None:
    """Re-split the product B @ A of a low-rank, SLTrain or LOST layer as B = U sqrt(S), A = sqrt(S) V^T.

    The product (hence the layer's function) is unchanged up to float32 rounding and the rank is
    kept; the factors become balanced (B^T B = A A^T = S). Written in place into the same
    Parameters, so optimizer state stays keyed to them, but their moments now describe other
    coordinates: reset them (CycleTricks does).
    """
    if not isinstance(module, REFACTORABLE):
        raise TypeError(f"refactor_ needs one of {[c.__name__ for c in REFACTORABLE]}, got {type(module)}")
    A, B = module.A, module.B
    # B = Qb Rb and A^T = Qa Ra reduce the SVD of the (out x in) product to one of the r x r core
    # Rb Ra^T: O((out + in) r^2) instead of O(out in r), and no dense weight is formed.
    Qb, Rb = torch.linalg.qr(B.float())
    Qa, Ra = torch.linalg.qr(A.float().t())
    U, S, Vh = torch.linalg.svd(Rb.double() @ Ra.double().t())
    root = S.sqrt()
    B.copy_(Qb @ (U * root).float())
    A.copy_((root[:, None] * Vh).float() @ Qa.t())


# ---- optimizer-state pruning ----------------------------------------------------------------------
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


def _prune_quantized_(state: dict, key: str, prefix: str, fraction: float) -> int:
    import bitsandbytes.functional as bnbf

    from sltrain.optim.adam8bit import BLOCKSIZE

    index = key[-1]
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

    Moments are the float tensors named in FLOAT_MOMENTS and bitsandbytes' 8-bit `state1`/`state2`.
    "step" and every other entry stay as they are. Returns the number of entries zeroed.
    """
    if not 0.0 <= prune <= 1.0:
        raise ValueError(f"prune fraction {prune} is outside [0, 1]")
    zeroed = 0
    for p in params:
        for holder in _holders(optimizer, p):
            state = holder.state.get(p)
            for key, value in list((state or {}).items()):
                if not isinstance(value, torch.Tensor):
                    continue
                quantized = next((k for k in QUANTIZED_MOMENTS if key.endswith(k)), None)
                if quantized is not None and value.dtype == torch.uint8:
                    zeroed += _prune_quantized_(state, key, key[: -len(quantized)], prune)
                elif (quantized is not None or key.endswith(FLOAT_MOMENTS)) and value.is_floating_point():
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
def validate(cfg: RunConfig) -> None:
    """Refuse combinations of method and tricks that cannot work, naming the fix."""
    method, opt = cfg.method.name, cfg.optimizer
    every = flag_for("optimizer.reset_every")
    if method == "relora" and opt.reset_every == 0:
        raise UserError(f"method relora merges its factors every {every} steps, which is 0; "
                        f"pass e.g. {every} 1000")
    if opt.refactor and method in ("full", "relora", "sparse"):
        refactor = flag_for("optimizer.refactor")
        raise UserError(f"{refactor} re-splits the B @ A factors of methods lowrank, sltrain and lost, "
                        f"not {method}; pass --method lowrank, sltrain or lost, or drop {refactor}")
    if cfg.method.warm_start_steps > 0 and method != "relora":
        raise UserError(f"{flag_for('method.warm_start_steps')} {cfg.method.warm_start_steps} is only "
                        f"for method relora, not {method}; drop it or pass --method relora")
    if (opt.refactor or opt.reset_momentum) and opt.reset_every == 0:
        trick = flag_for("optimizer.refactor" if opt.refactor else "optimizer.reset_momentum")
        raise UserError(f"{trick} acts every {every} steps, which is 0; pass e.g. {every} 1000")


def include_warm_start_params(model: nn.Module, cfg: RunConfig) -> None:
    """For a ReLoRA run with a warm start, make dense weights and factors alike trainable before
    the optimizer is built, so that it holds both; CycleTricks then freezes the phase's others."""
    if cfg.method.name == "relora" and cfg.method.warm_start_steps > 0:
        for layer in model.modules():
            if isinstance(layer, ReLoRALinear):
                for p in (layer.weight, layer.A, layer.B):
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
        self.relora_names = [n for n, m in model.named_modules() if isinstance(m, ReLoRALinear)]
        self.relora = [model.get_submodule(n) for n in self.relora_names]
        self.factored = [m for m in model.modules() if isinstance(m, REFACTORABLE)]
        self.warm_start = cfg.method.warm_start_steps if self.relora else 0
        self.every = opt.reset_every
        self.refactor = opt.refactor and bool(self.factored)
        self.reset_momentum = opt.reset_momentum
        self.state_prune = opt.state_prune
        self.resets = bool(self.every) and (bool(self.relora) or self.refactor or self.reset_momentum)
        self.start_at(start_step)

    def start_at(self, step: int) -> None:
        """Continue after `step` completed update steps: the warm start is on only before its end."""
        self.step = step
        if self.warm_start:
            warm = step < self.warm_start
            if warm and not all(_holds(self.optimizer, m.weight) and _holds(self.optimizer, m.A)
                                for m in self.relora):
                raise RuntimeError("the ReLoRA warm start needs an optimizer over dense weights and "
                                   "factors; call include_warm_start_params before building it")
            for layer in self.relora:
                layer.set_warm_start(warm)

    def state_dict(self) -> dict[str, int]:
        # Everything else the tricks do follows from the step (ReLoRA's fresh factors are seeded
        # by the run, the layer and the step), so the step is their whole state.
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start_at(state["step"])

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def after_step(self, step: int) -> dict[str, int]:
        """Apply whatever falls due after update `step` (1-based); returns what happened."""
        self.step = step
        events: dict[str, int] = {}
        if self.warm_start and step == self.warm_start:
            for layer in self.relora:
                layer.set_warm_start(False)
            # The dense weights never train again: their moments are dead weight.
            drop_state_(self.optimizer, [layer.weight for layer in self.relora])
            events["relora_warm_start_end"] = 1
        if not self.resets or step <= self.warm_start or (step - self.warm_start) % self.every:
            return events
        if self.relora:
            for name, layer in zip(self.relora_names, self.relora, strict=True):
                # A seed from the run, the layer and the step rather than the global RNG: every
                # data-parallel rank draws the same fresh A, and a resumed run draws what the
                # uninterrupted one would have.
                g = torch.Generator(layer.A.device).manual_seed(layer_seed(self.seed, f"{name}@{step}"))
                layer.merge_and_reinit_(g)
            # ReLoRA keeps the few largest moments: the rest describe the old factors.
            factors = [p for layer in self.relora for p in (layer.A, layer.B)]
            prune_state_(self.optimizer, factors, self.state_prune)
            events["relora_merge"] = len(self.relora)
        if self.refactor:
            for layer in self.factored:
                refactor_(layer)
            # The factors now have other coordinates, so their moments are meaningless: reset them
            # whether or not reset_momentum asks for it.
            prune_state_(self.optimizer, [p for layer in self.factored for p in (layer.A, layer.B)], 1.0)
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
