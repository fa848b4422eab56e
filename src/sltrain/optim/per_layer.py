"""Per-layer updates: step each parameter inside its post-accumulate-grad hook, so that the full
set of gradients never exists at once (the trick GaLore uses to fit LLaMA 7B into 24 GB).

Unlike the published implementations, this one honours gradient accumulation (a parameter
steps once per optimizer step, after its last micro-batch, not on every backward), shares the
learning-rate schedule through the usual scheduler, and saves and restores every state.
"""

from __future__ import annotations

import torch

from sltrain.errors import UserError


class PerLayerOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer: one copy of it (same class and group settings) per parameter, stepped
    by that parameter's hook after every `grad_accum`-th backward.

    `param_groups` are the copies' own group dicts, so a scheduler that sets `lr` on this
    wrapper sets it for every copy; `step()` does nothing (the hooks already stepped).
    Gradient clipping by the global norm is impossible here (no two gradients coexist), so the
    builder refuses a clip setting (see `check`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, grad_accum: int = 1):
        self.grad_accum = grad_accum
        self.inner_class = type(optimizer)
        self._by_param: dict[int, torch.optim.Optimizer] = {}
        self._calls: dict[int, int] = {}
        self._handles = []
        self.skipped_nonfinite = 0
        groups = []
        for group in optimizer.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                sub = self.inner_class([{**settings, "params": [p]}])
                self._by_param[id(p)] = sub
                self._calls[id(p)] = 0
                groups.append(sub.param_groups[0])
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        super().__init__(groups, {})

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        self._calls[id(p)] += 1
        if self._calls[id(p)] % self.grad_accum:
            return  # more micro-batches of this step are still to come: keep accumulating
        if torch.isfinite(p.grad).all():
            self._by_param[id(p)].step()
        else:  # the loop sees the non-finite loss and stops with the last good checkpoint
            self.skipped_nonfinite += 1
        p.grad = None

    def optimizers_for(self, p: torch.Tensor) -> list[torch.optim.Optimizer]:
        sub = self._by_param.get(id(p))
        return [sub] if sub is not None else []

    @property
    def moment_keys(self) -> tuple[str, ...]:
        """The wrapped optimizer's: its copies hold the state."""
        from sltrain.optim.tricks import moment_keys

        subs = list(self._by_param.values())
        return moment_keys(subs[0]) if subs else ()

    def step(self, closure=None):  # type: ignore[override]
        return closure() if closure is not None else None

    def state_dict(self) -> dict:  # type: ignore[override]
        subs = [self._by_param[id(g["params"][0])] for g in self.param_groups]
        return {"per_parameter": [sub.state_dict() for sub in subs]}

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


def check(grad_clip: float) -> None:
    if grad_clip > 0:
        raise UserError(f"per-layer updates cannot clip by the global gradient norm ({grad_clip}): "
                        "the gradients never exist together; pass --grad-clip 0")
