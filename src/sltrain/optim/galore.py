"""GaLore: Adam whose moments live in a rank-r subspace of each block matrix's gradient.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et al., ICML 2024).
"""

from __future__ import annotations

import torch
from torch import nn

from sltrain.config import OptimizerConfig
from sltrain.errors import UserError
from sltrain.optim import projector
from sltrain.optim.adam8bit import adam_direction_8bit, quantized_moments_bytes
from sltrain.optim.base import SltrainOptimizer, adam_direction, adam_step_size, apply_update_
from sltrain.optim.projector import SubspaceOptions
from sltrain.registry import OPTIMIZERS


class GaLore(SltrainOptimizer):
    """AdamW with GaLore projection on the "matrix" groups and plain AdamW elsewhere.

    Matches `galore_torch.GaLoreAdamW` (proj_type "std") step for step, with two deliberate
    differences: weight decay is applied to the weight before the update (decoupled AdamW, as
    torch does; the reference decays the already-updated weight), and a failed SVD keeps the last
    projector or raises instead of producing a zero or NaN update. `eight_bit` keeps every Adam
    moment in bitsandbytes' blockwise 8-bit format (GaLore's 8-bit variant).
    """

    moment_keys = ("exp_avg", "exp_avg_sq", "state1", "state2")  # float, or 8-bit (eight_bit)

    shares_state_across_instances = True  # the 8-bit quantisation maps are module-level

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int = 128,
                 update_proj_gap: int = 200, scale: float = 0.25, projector: str = "svd",
                 eight_bit: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, projector=projector,
                        eight_bit=eight_bit, kind="other")
        super().__init__(params, defaults)

    def _direction(self, grad, state, group):
        beta1, beta2 = group["betas"]
        if group["eight_bit"]:
            return adam_direction_8bit(grad, state, beta1, beta2, group["eps"], dtype=grad.dtype)[0]
        return adam_direction(grad, state, beta1, beta2, group["eps"])[0]

    def step_size(self, state: dict, group: dict, step: int | None = None) -> float:
        beta1, beta2 = group["betas"]
        return adam_step_size(group["lr"], beta1, beta2, state["step"] if step is None else step)

    def _subspace(self, p: torch.Tensor, group: dict) -> int | None:
        return projector.subspace_rank(p.shape, group["rank"]) if group["kind"] == "matrix" else None

    def _refresh_if_due(self, p: torch.Tensor, state: dict, group: dict, rank: int) -> bool:
        """Refresh the projector on updates 0, gap, 2 gap, ... (the reference's schedule)."""
        due = state.get("step", 0) % group["update_proj_gap"] == 0 or (
            "ortho" not in state and "dct_idx" not in state)
        if due:
            projector.refresh(state, p.grad, rank, group["projector"])
        return due

    def matrix_update(self, p: torch.Tensor, state: dict, group: dict, rank: int) -> torch.Tensor:
        """The update direction of one projected matrix (before the step size of `step_size`);
        subclasses change this."""
        self._refresh_if_due(p, state, group, rank)
        low = projector.project(p.grad, state)
        state["step"] = state.get("step", 0) + 1
        direction = self._direction(low, state, group)
        return projector.project_back(direction, state, p.shape) * group["scale"]

    def update_(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        rank = self._subspace(p, group)
        if rank is None:
            state["step"] = state.get("step", 0) + 1
            update = self._direction(p.grad, state, group)
        else:
            update = self.matrix_update(p, state, group, rank)
        apply_update_(p, update, -self.step_size(state, group), group)

    def moments_bytes(self, numel: int, group: dict, element_size: int) -> int:
        return quantized_moments_bytes(numel) if group["eight_bit"] else 2 * numel * element_size

    def state_bytes(self, p: torch.Tensor, group: dict, element_size: int) -> int:
        rank = self._subspace(p, group)
        if rank is None:
            return self.moments_bytes(p.numel(), group, element_size)
        return (self.moments_bytes(rank * max(p.shape), group, element_size)
                + projector.projector_bytes(p.shape, rank, group["projector"], element_size))

    def step_transient_bytes(self, element_size: int) -> int:
        """The most bytes a step holds besides the states and gradients, from the shapes: for a
        projected (m, n) matrix, the projector refresh's SVD (the float32 matrix, U, V^T and
        LAPACK's ~4 k^2 workspace, k = min(m, n); on the first step and every update_proj_gap)
        or else the projected-back update and its scaled copy; for the others, the Adam
        temporaries (five float32 copies with 8-bit moments, two without)."""
        most = 0
        for group in self.param_groups:
            for p in group["params"]:
                n, rank = p.numel(), self._subspace(p, group)
                if rank is None:
                    most = max(most, (5 if group["eight_bit"] else 2) * 4 * n)
                else:
                    k = min(p.shape)
                    most = max(most, 4 * (n + k * sum(p.shape) + 4 * k * k), 2 * n * element_size)
        return most

    def shared_state_bytes(self) -> int:
        from sltrain.optim.adam8bit import MIN_8BIT_SIZE

        def low_numel(p, g):
            rank = self._subspace(p, g)
            return p.numel() if rank is None else rank * max(p.shape)

        any_8bit = any(g["eight_bit"] and low_numel(p, g) >= MIN_8BIT_SIZE
                       for g in self.param_groups for p in g["params"])
        return 2 * 256 * 4 if any_8bit else 0


def check_rank(groups: list[dict], rank: int) -> list[dict]:
    """Refuse a projection rank that no block matrix is larger than: the optimizer would
    silently be plain Adam (e.g. the default rank on SLTrain's r x in factors)."""
    shapes = [p.shape for g in groups if g["kind"] == "matrix" for p in g["params"]]
    if shapes and all(projector.subspace_rank(s, rank) is None for s in shapes):
        smallest = max(min(s) for s in shapes)
        raise UserError(
            f"projection rank {rank} is not below the smaller side of any block matrix (largest "
            f"such side: {smallest}), so nothing would be projected; pass e.g. "
            f"--proj-rank {max(1, smallest // 4)}"
        )
    return groups


def options(cfg: OptimizerConfig, rank: int) -> dict:
    return dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, rank=rank,
                update_proj_gap=cfg.update_proj_gap, scale=cfg.galore_scale,
                projector=cfg.projector)


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> GaLore:
    from sltrain.optim import param_groups

    return GaLore(check_rank(param_groups(model, cfg), rank), **options(cfg, rank))


def build_8bit(model: nn.Module, cfg: OptimizerConfig, rank: int) -> GaLore:
    from sltrain.optim import param_groups

    return GaLore(check_rank(param_groups(model, cfg), rank), eight_bit=True, **options(cfg, rank))


OPTIMIZERS.register("galore", build, options=SubspaceOptions,
                    doc="GaLore: Adam moments in a rank-r subspace of each gradient")
OPTIMIZERS.register("galore8bit", build_8bit, options=SubspaceOptions,
                    doc="GaLore with 8-bit moments")
