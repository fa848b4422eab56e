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
from sltrain.optim.rounding import flat_chunks

# How the hooks clip when they step during backward (grad_accum 1), with threshold `grad_clip`:
#   exact          two backward passes over the retained graph: the first only sums the squared
#                  norms (freeing each gradient at once), the second steps each gradient times
#                  min(1, clip / global norm): exact clipping for one more backward of time;
#   previous_norm  scale each gradient by min(1, clip / the previous step's global norm) and
#                  cap its own norm at clip (a bound exact global clipping also implies);
#   running_norm   the same with the global norm estimated from this step's norms of the
#                  gradients seen so far and the previous step's of the others (exact at the last);
#   update_rms     StableAdamW / Adafactor: shrink a parameter's update so that its RMS, in
#                  units of the learning rate, is at most clip (the moments see the raw gradient);
#   none           no clipping (then --grad-clip must be 0).
CLIP_MODES = ("exact", "previous_norm", "running_norm", "update_rms", "none")


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
        self._index: dict[int, int] = {}  # parameter -> its place in param_groups
        self._step_sq: dict[int, torch.Tensor] = {}  # squared gradient norms of this step
        self._previous_sq: dict[int, float] = {}  # ... and of the previous one
        self._estimate: torch.Tensor | float = 0.0  # running_norm's estimate of the squared norm
        self._measuring = False  # exact's first pass
        self._exact_scale = torch.ones(())  # exact's min(1, clip / global norm), between the passes
        self.grad_norm: float | None = None  # of the last step
        self.previous_norm: float | None = None  # what previous_norm clipping divides by
        self.skipped_nonfinite = 0
        self._found_inf: list[torch.Tensor] = []  # this step's device-side skips (fused AdamW)
        groups = []
        for group in optimizer.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                sub = self.inner_class([{**settings, "params": [p]}])
                self._by_param[id(p)] = sub
                self._index[id(p)] = len(groups)
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

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, twice over the retained graph under exact clipping in the hooks
        (a non-finite norm skips the second pass: nothing steps)."""
        if not (self._in_hooks and self.clip and self.clip_mode == "exact"):
            loss.backward()
            return
        self._measuring = True
        try:
            loss.backward(retain_graph=True)
        finally:
            self._measuring = False
        # As clip_grad_norm_ computes it, in parameter order, to the last bit.
        norms = [self._step_sq[i].sqrt() for i in sorted(self._step_sq)]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if not torch.isfinite(norm):
            self.skipped_nonfinite += 1
            return
        self._exact_scale = torch.clamp(self.clip / (norm + 1e-6), max=1.0)
        loss.backward()

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if not self._in_hooks:
            return  # accumulating, or the Trainer steps after clipping by the global norm
        i = self._index[id(p)]
        if self._measuring:
            self._step_sq[i] = torch.linalg.vector_norm(p.grad.detach()).float().square()
            p.grad = None
            return
        if self.clip and self.clip_mode == "exact":
            p.grad.mul_(self._exact_scale.to(p.grad.device))
            # The first pass's global norm was finite, so is every gradient of this pass (the
            # same graph): no check per parameter.
            self._step_param(p, finite=True)
            return
        sq = self._step_sq[i] = p.grad.detach().float().square().sum()
        if self.clip and self.clip_mode in ("previous_norm", "running_norm"):
            p.grad.mul_(self._clip_scale(i, sq).to(p.grad.dtype))
        self._step_param(p, clip_update=bool(self.clip) and self.clip_mode == "update_rms")

    def _clip_scale(self, i: int, sq: torch.Tensor) -> torch.Tensor:
        """min(1, clip / the estimated global norm, clip / this gradient's own norm)."""
        if self.clip_mode == "running_norm":
            self._estimate = self._estimate + sq - self._previous_sq.get(i, 0.0)
            scale = torch.clamp(self.clip / (self._estimate.sqrt() + 1e-6), max=1.0)
        else:
            scale = torch.ones(())
            if self.previous_norm is not None:
                scale = scale.clamp(max=self.clip / (self.previous_norm + 1e-6))
        return torch.minimum(scale, self.clip / (sq.sqrt() + 1e-6))

    def _step_param(self, p: torch.Tensor, clip_update: bool = False,
                    finite: bool | None = None) -> None:
        """Step `p` alone and free its gradient; a non-finite gradient leaves it and its state.
        `finite` says whether the gradient is, when the caller knows; otherwise an optimizer that
        can skip on the device (fused AdamW's found_inf) is told, and only another is asked
        on the host (a sync per parameter, where no device-side skip exists)."""
        sub = self._by_param[id(p)]
        if finite is None:
            can_skip = getattr(sub, "can_skip_on_device", None)
            if can_skip is not None and can_skip(p):
                sub.found_inf = (~torch.isfinite(p.grad).all()).float()
                self._found_inf.append(sub.found_inf)
                finite = True  # the device decides
            else:
                finite = all_finite(p.grad)
        if not finite:
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
        if hasattr(sub, "found_inf"):
            del sub.found_inf
        p.grad = None

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """End the update: step every parameter with a gradient (unless the hooks did), and
        record the step's global gradient norm. One host sync: the norms, the gradients'
        finiteness and the device-side skips are read together."""
        loss = closure() if closure is not None else None
        live = []
        if not self.steps_in_hooks:
            live = [(i, g["params"][0]) for i, g in enumerate(self.param_groups)
                    if g["params"][0].grad is not None]
            for i, p in live:
                self._step_sq[i] = p.grad.detach().float().square().sum()
        keys = list(self._step_sq)
        flags = [torch.isfinite(p.grad).all().float() for _, p in live] + self._found_inf
        read = torch.stack([*(self._step_sq[i] for i in keys), *flags]).tolist() if keys or flags else []
        values, flags = read[:len(keys)], read[len(keys):]
        for (_, p), ok in zip(live, flags[:len(live)], strict=True):
            self._step_param(p, finite=bool(ok))
        self.skipped_nonfinite += int(sum(flags[len(live):]))
        self.grad_norm, self._step_sq, self._found_inf = math.sqrt(sum(values)), {}, []
        if math.isfinite(self.grad_norm):  # a non-finite gradient was not stepped: forget it
            self.previous_norm, self._previous_sq = self.grad_norm, dict(zip(keys, values, strict=True))
        self._estimate = sum(self._previous_sq.values())
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
                "previous_norm": self.previous_norm, "previous_sq": self._previous_sq}

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
        # Older checkpoints have no previous norms yet.
        self.previous_norm = state_dict.get("previous_norm")
        self._previous_sq = dict(state_dict.get("previous_sq") or {})
        self._estimate = sum(self._previous_sq.values())

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


def all_finite(t: torch.Tensor) -> bool:
    """`torch.isfinite(t).all()` a slice at a time. Whole, its temporaries (|t| and three masks,
    3.5 bytes an element for bf16) reach 160 MB for llama-350m's LM-head gradient, stepped at the
    start of the backward, beside every activation; sliced, a few MB."""
    finite = torch.ones((), dtype=torch.bool, device=t.device)
    for _, (piece,) in flat_chunks(t):
        finite &= torch.isfinite(piece).all()
    return bool(finite)


def check(grad_clip: float, clip_mode: str, grad_accum: int) -> None:
    """Refuse a clip setting the hooks cannot honour."""
    if clip_mode not in CLIP_MODES:
        raise UserError(f"--per-layer-clip {clip_mode} is not one of {', '.join(CLIP_MODES)}")
    if grad_clip > 0 and grad_accum == 1 and clip_mode == "none":
        raise UserError(f"per-layer updates without accumulation cannot clip by the global "
                        f"gradient norm ({grad_clip}): the gradients never exist together; pass "
                        "--per-layer-clip exact, previous_norm, running_norm or update_rms, or --grad-clip 0")
