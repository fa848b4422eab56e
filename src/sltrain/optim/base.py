"""What every `sltrain` optimizer shares: parameter groups by role and exact state accounting.

Groups carry a `kind`: "matrix" (2-D weights of the attention/MLP blocks, where subspace and
orthogonalising optimizers act) or "other" (embeddings, LM head, norms, sparse values: AdamW).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from sltrain.optim.rounding import LOW_PRECISION, flat_chunks, round_into_

# Adam as in the GaLore/Fira reference code (transformers' AdamW): eps is added to sqrt(v) before
# the bias correction, which is folded into the step size. Kept identical so that the subspace
# optimizers match their reference packages to rounding.


def adam_moments_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                  beta1: float, beta2: float, eps: float, step: int) -> tuple[torch.Tensor, float]:
    """Fold `grad` into the moments in place; return m / (sqrt(v) + eps) and the bias-correction
    factor sqrt(1 - beta2^t) / (1 - beta1^t) of update number `step` (1-based).

    bf16 moments are updated in float32 and rounded back stochastically: in bf16 itself
    v * 0.999 rounds back to v, so the second moment could never decay."""
    if exp_avg.dtype in LOW_PRECISION:
        direction = torch.empty_like(grad)
        for _, (m16, v16, g, d) in flat_chunks(exp_avg, exp_avg_sq, grad.contiguous(), direction):
            m, v = m16.float(), v16.float()
            chunk, correction = adam_moments_(m, v, g.float(), beta1, beta2, eps, step)
            round_into_(m16, m)
            round_into_(v16, v)
            d.copy_(chunk)
        return direction, correction
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    return exp_avg / denom, math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def adam_direction(grad: torch.Tensor, state: dict, beta1: float, beta2: float, eps: float,
                   step: int | None = None) -> tuple[torch.Tensor, float]:
    """Adam on `state["exp_avg"]`/`state["exp_avg_sq"]` (created on first use) for update number
    `step` (default `state["step"]`, which must already count this update)."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    return adam_moments_(state["exp_avg"], state["exp_avg_sq"], grad, beta1, beta2, eps,
                         state["step"] if step is None else step)


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """lr * sqrt(1 - beta2^t) / (1 - beta1^t), evaluated in the reference packages' order so
    that results agree to the last bit."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def adam_state_bytes(numel: int, element_size: int) -> int:
    return 2 * numel * element_size


def decay_(p: torch.Tensor, group: dict) -> None:
    """Decoupled weight decay on the weight before this step's update (Loshchilov & Hutter)."""
    if group.get("weight_decay", 0.0) > 0:
        p.mul_(1.0 - group["lr"] * group["weight_decay"])


def apply_update_(p: torch.Tensor, update: torch.Tensor, alpha: float, group: dict) -> None:
    """p <- p (1 - lr wd) + alpha update, the weight write of every optimizer here. A float32
    weight is updated in place; a bf16 one (`--precision bf16`) in float32 and then rounded
    stochastically, so a step far below bf16's resolution still moves it in expectation."""
    if p.dtype not in LOW_PRECISION:
        decay_(p, group)
        p.add_(update, alpha=alpha)
        return
    for _, (weight, step) in flat_chunks(p, update.contiguous()):
        w = weight.float()
        decay_(w, group)
        w.add_(step.float(), alpha=alpha)
        round_into_(weight, w)


class SltrainOptimizer(torch.optim.Optimizer):
    """A torch optimizer that can say, from shapes alone, how many bytes of state it will hold.

    `state_bytes` must equal the bytes of the tensors `state_dict()["state"][i]` holds for that
    parameter once it has been stepped; `shared_state_bytes` counts tensors shared by all
    parameters (counted once). Tests hold both against real `state_dict()`s.

    `moment_keys` names the state entries that are moments (a key matches if it is or ends with
    one), which the cycle tricks prune or reset; a subclass with other moments extends it, and a
    test holds every optimizer's against the state it creates.
    """

    moment_keys: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")  # adamw_other_'s

    def state_bytes(self, p: torch.Tensor, group: dict, element_size: int) -> int:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every loaded state tensor to its parameter's dtype; 8-bit codes, their
        float32 scales and index tensors must come back exactly as saved."""
        saved_tensors = {
            (index, key): value
            for index, entry in state_dict["state"].items()
            for key, value in entry.items()
            if isinstance(value, torch.Tensor) and key != "step"
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for (index, key), saved in saved_tensors.items():
            p = params[index]
            if saved.dtype != p.dtype:
                self.state[p][key] = saved.to(device=p.device)

    def shared_state_bytes(self) -> int:
        return 0

    def update_(self, p: torch.Tensor, group: dict) -> None:
        """Step one parameter that has a gradient; the weight is written by `apply_update_`
        (so that bf16 weights round stochastically)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update_(p, group)
        return loss

    def adamw_other_(self, p: torch.Tensor, group: dict) -> None:
        """Plain AdamW step for a parameter of an "other" group (state: exp_avg, exp_avg_sq)."""
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        beta1, beta2 = group["betas"]
        direction, _ = adam_direction(p.grad, state, beta1, beta2, group["eps"])
        apply_update_(p, direction, -adam_step_size(group["lr"], beta1, beta2, state["step"]), group)
