"""Per-layer updates: step each parameter inside its post-accumulate-grad hook, so that the full
set of gradients never exists at once (the trick GaLore uses to fit LLaMA 7B into 24 GB).

Unlike the published implementations, this one honours gradient accumulation and clipping: with
`grad_accum` > 1 the gradients coexist anyway, so the Trainer clips them by the exact global
norm and `step()` steps each parameter and frees its gradient; with `grad_accum` 1 the hooks
step during backward under a clipping that needs no other gradient (`CLIP_MODES`). It shares
the learning-rate schedule through the usual scheduler and saves and restores every state.
"""

from __future__ import annotations

import math

import torch

from sltrain.errors import UserError

# How the hooks clip when they step during backward (grad_accum 1), with threshold `grad_clip`:
#   previous_norm  scale each gradient by min(1, clip / the previous step's global norm) and
#                  cap its own norm at clip (a bound exact global clipping also implies);
#   update_rms     StableAdamW / Adafactor: shrink a parameter's update so that its RMS, in
#                  units of the learning rate, is at most clip (the moments see the raw gradient);
#   none           no clipping (then --grad-clip must be 0).
CLIP_MODES = ("previous_norm", "update_rms", "none")


class PerLayerOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer: one copy of it (same class and group settings) per parameter.

    The Trainer calls `micro_batch(last)` before each backward; with `grad_accum` 1 the hooks of
    the last (only) backward step their parameters, otherwise `step()` steps them after the
    Trainer has clipped. A parameter without a gradient in a step does not step. `grad_norm` is
    the step's exact global gradient norm (before clipping), summed from each parameter's norm.
    `param_groups` are the copies' own group dicts, so a scheduler that sets `lr` on this
    wrapper sets it for every copy.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, grad_accum: int = 1,
                 clip: float = 0.0, clip_mode: str = "none"):
        self.grad_accum, self.clip, self.clip_mode = grad_accum, clip, clip_mode
        self.inner_class = type(optimizer)
        self._by_param: dict[int, torch.optim.Optimizer] = {}
        self._handles = []
        self._in_hooks = grad_accum == 1  # until the Trainer says otherwise
        self._sq_norm: torch.Tensor | float = 0.0
        self.grad_norm: float | None = None  # of the last step
        self.previous_norm: float | None = None  # what previous_norm clipping divides by
        self.skipped_nonfinite = 0
        groups = []
        for group in optimizer.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                sub = self.inner_class([{**settings, "params": [p]}])
                self._by_param[id(p)] = sub
                groups.append(sub.param_groups[0])
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        super().__init__(groups, {})

    @property
    def steps_in_hooks(self) -> bool:
        """True when the hooks step (and clip) during backward: no two gradients coexist."""
        return self.grad_accum == 1

    def micro_batch(self, last: bool) -> None:
        """Before each backward: is it the step's last? Only then, and only without
        accumulation, do the hooks step."""
        self._in_hooks = last and self.steps_in_hooks

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if not self._in_hooks:
            return  # accumulating, or the Trainer steps after clipping by the global norm
        norm = p.grad.detach().float().norm()
        self._sq_norm = self._sq_norm + norm.square()
        if self.clip and self.clip_mode == "previous_norm":
            scale = 1.0
            if self.previous_norm is not None and math.isfinite(self.previous_norm):
                scale = min(1.0, self.clip / (self.previous_norm + 1e-6))
            p.grad.mul_(torch.clamp(self.clip / (norm + 1e-6), max=scale).to(p.grad.dtype))
        self._step_param(p, clip_update=bool(self.clip) and self.clip_mode == "update_rms")

    def _step_param(self, p: torch.Tensor, clip_update: bool = False) -> None:
        """Step `p` alone and free its gradient; a non-finite gradient leaves it and its state."""
        sub = self._by_param[id(p)]
        if not torch.isfinite(p.grad).all():
            self.skipped_nonfinite += 1
        elif clip_update:
            before = p.detach().clone()
            sub.step()
            update = p.detach() - before
            rms = update.float().square().mean().sqrt() / max(sub.param_groups[0]["lr"], 1e-30)
            # p = before + update * min(1, clip / rms), without a sync on the ratio
            p.copy_(before.add_(update.mul_(torch.clamp(self.clip / (rms + 1e-12), max=1.0))))
        else:
            sub.step()
        p.grad = None

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """End the update: step every parameter with a gradient (unless the hooks did), and
        record the step's global gradient norm."""
        loss = closure() if closure is not None else None
        if not self.steps_in_hooks:
            for group in self.param_groups:
                p = group["params"][0]
                if p.grad is not None:
                    self._sq_norm = self._sq_norm + p.grad.detach().float().norm().square()
                    self._step_param(p)
        norm = float(self._sq_norm) ** 0.5
        self.grad_norm, self._sq_norm = norm, 0.0
        self.previous_norm = norm
        self._in_hooks = self.steps_in_hooks
        return loss

    def optimizers_for(self, p: torch.Tensor) -> list[torch.optim.Optimizer]:
        sub = self._by_param.get(id(p))
        return [sub] if sub is not None else []

    @property
    def moment_keys(self) -> tuple[str, ...]:
        """The wrapped optimizer's: its copies hold the state."""
        from sltrain.optim.tricks import moment_keys

        subs = list(self._by_param.values())
        return moment_keys(subs[0]) if subs else ()

    def state_dict(self) -> dict:  # type: ignore[override]
        subs = [self._by_param[id(g["params"][0])] for g in self.param_groups]
        return {"per_parameter": [sub.state_dict() for sub in subs],
                "previous_norm": self.previous_norm}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        saved = state_dict.get("per_parameter")
        if saved is None or len(saved) != len(self.param_groups):
            raise UserError("the checkpoint's optimizer state was not saved with per-layer updates "
                            "for this model; resume with the run's own --per-layer-updates setting")
        for i, sub_state in enumerate(saved):
            sub = self._by_param[id(self.param_groups[i]["params"][0])]
            sub.load_state_dict(sub_state)
            # Loading replaces the copy's group dict; share the new one again so that the
            # scheduler keeps setting the rate the copy uses.
            self.param_groups[i] = sub.param_groups[0]
        self.previous_norm = state_dict.get("previous_norm")  # older checkpoints: none yet

    def state_bytes(self, p: torch.Tensor, group: dict, element_size: int) -> int:
        sub = self._by_param[id(p)]
        return sub.state_bytes(p, sub.param_groups[0], element_size)

    def shared_state_bytes(self) -> int:
        shared = [sub.shared_state_bytes() for sub in self._by_param.values()]
        # Tensors shared by all instances of a class (module-level caches) exist once.
        if getattr(self.inner_class, "shares_state_across_instances", False):
            return max(shared, default=0)
        return sum(shared)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def check(grad_clip: float, clip_mode: str, grad_accum: int) -> None:
    """Refuse a clip setting the hooks cannot honour."""
    if clip_mode not in CLIP_MODES:
        raise UserError(f"--per-layer-clip {clip_mode} is not one of {', '.join(CLIP_MODES)}")
    if grad_clip > 0 and grad_accum == 1 and clip_mode == "none":
        raise UserError(f"per-layer updates without accumulation cannot clip by the global "
                        f"gradient norm ({grad_clip}): the gradients never exist together; pass "
                        "--per-layer-clip previous_norm or update_rms, or --grad-clip 0")
