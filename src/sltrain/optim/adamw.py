"""AdamW (torch's fused/foreach implementation) with exact state accounting.

"Decoupled Weight Decay Regularization" (Loshchilov & Hutter, 2019): the default optimizer.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from sltrain.config import OptimizerConfig
from sltrain.optim.rounding import CHUNK, LOW_PRECISION, flat_chunks, round_into_
from sltrain.registry import OPTIMIZERS


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW; state per parameter: exp_avg, exp_avg_sq and a float32 step tensor.

    float32 (and float64) parameters take torch's own step. bf16 parameters (`--precision bf16`) take the same
    update per parameter in float32, with the weight and both moments rounded back to bf16
    stochastically: torch's step would compute in bf16, where a step below 1/256 of the weight
    and the decay v * 0.999 both round away. Same state layout, so the accounting holds.
    """

    moment_keys = ("exp_avg", "exp_avg_sq")

    def state_bytes(self, p: torch.Tensor, group: dict, element_size: int) -> int:
        return 2 * p.numel() * element_size + 4

    def shared_state_bytes(self) -> int:
        return 0

    def step_transient_bytes(self, element_size: int) -> int:
        """The most bytes a step holds besides the states and gradients: torch's foreach step on
        float32 weights forms sqrt(exp_avg_sq) for a whole group at once; the bf16 step works on
        slices of `CHUNK` elements, with eight float32 temporaries of a slice."""
        if element_size >= 4:
            return max(sum(p.numel() for p in g["params"]) * element_size for g in self.param_groups)
        largest = max(p.numel() for g in self.param_groups for p in g["params"])
        return 8 * 4 * min(largest, CHUNK)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, keeping this optimizer's own kernel: a checkpoint saved on a GPU (fused)
        resumes on CPU (foreach) and the other way round, each step count moved where its step
        reads it (the fused kernel: on the parameter's device; the others: on the host)."""
        own = {k: self.param_groups[0].get(k) for k in ("fused", "foreach")}
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(own)
        for p, state in self.state.items():
            if isinstance(state.get("step"), torch.Tensor):
                on_device = own["fused"] and p.dtype not in LOW_PRECISION
                state["step"] = state["step"].to(p.device if on_device else "cpu", torch.float32)

    def can_skip_on_device(self, p: torch.Tensor) -> bool:
        """Whether a step of `p` honours `self.found_inf` (a 0-d float tensor, 1 = skip) on the
        device, weights, moments and step count left exactly: torch's fused kernel does, as
        GradScaler uses it; the foreach kernel and the bf16 step here do not."""
        return bool(self.param_groups[0].get("fused")) and p.dtype not in LOW_PRECISION

    @torch.no_grad()
    def step(self, closure=None):
        low = [p for g in self.param_groups for p in g["params"] if p.dtype in LOW_PRECISION]
        if not low:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["amsgrad"]:
                raise ValueError("AdamW with amsgrad has no bf16 step here; use float32 weights")
            for p in group["params"]:
                if p.grad is not None:
                    self._low_precision_update(p, group)
        return loss

    def _low_precision_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step, (beta1, beta2) = state["step"].item(), group["betas"]
        tensors = (p, p.grad.contiguous(), state["exp_avg"], state["exp_avg_sq"])
        for _, (weight, grad, exp_avg, exp_avg_sq) in flat_chunks(*tensors):
            g = grad.float().neg() if group["maximize"] else grad.float()
            m = exp_avg.float().lerp_(g, 1.0 - beta1)
            v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            # torch's order: denom = sqrt(v) / sqrt(1 - beta2^t) + eps, step lr / (1 - beta1^t).
            denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(group["eps"])
            w = weight.float().mul_(1.0 - group["lr"] * group["weight_decay"])
            w.addcdiv_(m, denom, value=-group["lr"] / (1.0 - beta1**step))
            for target, value in ((weight, w), (exp_avg, m), (exp_avg_sq, v)):
                round_into_(target, value)


def kernel(params: list[torch.Tensor]) -> dict[str, bool]:
    """torch's fused kernel (one launch for every parameter) when they all live on a GPU and this
    torch has it; its foreach kernel elsewhere (on CPU, on meta for accounting)."""
    on_gpu = bool(params) and all(p.device.type == "cuda" for p in params)
    if on_gpu and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        return {"fused": True}
    return {"foreach": True}


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> AdamW:
    from sltrain.optim import param_groups

    groups = param_groups(model, cfg, split_matrices=False)
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 **kernel([p for g in groups for p in g["params"]]))


OPTIMIZERS.register("adamw", build, doc="AdamW (torch's fused kernel on CUDA, foreach elsewhere); "
                    "the default", elementwise=True)
